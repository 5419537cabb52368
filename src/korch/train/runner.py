"""Driver side of a training stage: tokenizer → prepared data → Ray Train with DeepSpeed → outputs.

Outputs in the stage folder: `final/` (HF model + tokenizer), `checkpoint-<step>/` per epoch, `metrics.jsonl`,
`events.jsonl`, `eval.json`, and `ray/` (Ray Train's storage with korch's consolidated checkpoints).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from korch.config import StageConfig
from korch.errors import StageFailed, UserError
from korch.train.failure import FAILURE_FILE, describe_failure, write_failure

RUN_STATE = "run.json"


@dataclass
class StageContext:
    """What a task runner gets besides its own stage spec."""

    stage_dir: Path
    start_from: str | None = None
    """The `final/` folder of the (trained) stage named in `needs`."""
    tokenizer_dir: str | None = None
    resume_from: str | None = None
    """A korch checkpoint folder (state.json + safetensors) to continue from (`--from-checkpoint`)."""
    needs: dict[str, Path] = field(default_factory=dict)
    """Every stage named in `needs`, in order: name -> its stage folder."""
    fresh_run: bool = False
    """Start a new Ray run name instead of resuming the stage's last one."""
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_tokenizer(stage: StageConfig, ctx: StageContext, task_cls) -> str:
    """The same choice a data_prepare stage makes; a trained one is cached in the stage's `tokenizer/`."""
    from korch.data.stage import resolve_tokenizer_dir

    return resolve_tokenizer_dir(stage, ctx, ctx.stage_dir / "tokenizer", texts=lambda: task_cls.training_texts(stage))


def _ray_run_name(stage_dir: Path, new: bool) -> str:
    """Ray resumes any run whose name and storage match, so korch records which name is current."""
    state_file = stage_dir / RUN_STATE
    if not new and state_file.exists():
        return json.loads(state_file.read_text())["ray_run_name"]
    name = "train" if not (stage_dir / "ray").exists() else f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    state_file.write_text(json.dumps({"ray_run_name": name}))
    return name


def _why_empty(manifest: dict) -> str:
    """What the prepared manifest says became of the input: ` (3 documents read; skipped: too_short 3)`."""
    from korch.data.readers import describe_skips

    if manifest.get("docs_in") is None:  # a manifest kind that does not count documents
        return ""
    return f" ({manifest['docs_in']} documents read; skipped: {describe_skips(manifest.get('skipped'))})"


def run_training_stage(stage: StageConfig, ctx: StageContext) -> dict:
    """Any trained task: its `TrainTask` prepares the data, then the shared loop runs on Ray Train + DeepSpeed."""
    import ray
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from korch.data.pipeline import check_shards, load_manifest, rows_per_worker
    from korch.tasks import TASKS
    from korch.train.deepspeed_config import build_deepspeed_config
    from korch.train.loop import FAIL_ENV, TrainLoopConfig, plan_steps, train_loop_per_worker
    from korch.train.progress import ProgressView
    from korch.train.runlog import start_run_log
    from korch.train.scaling import build_failure_config, build_scaling_config, build_torch_config

    dist = stage.distributed
    task_cls = TASKS[stage.task].load_trainer()
    options = stage.options
    tokenizer_dir = ctx.tokenizer_dir or resolve_tokenizer(stage, ctx, task_cls)
    prepared = task_cls.prepare_data(stage, ctx, tokenizer_dir)
    manifest = load_manifest(prepared)
    check_shards(manifest, prepared)  # in the driver: a missing shard is one line, not retried worker failures
    if not manifest.get("splits", {}).get("train", {}).get("rows"):
        raise UserError(f"stage {stage.name}: no training rows in {prepared}{_why_empty(manifest)}; check "
                        "data.inputs and the data filters (min_doc_chars, max_docs)")
    seq_len = int(manifest.get("seq_len", stage.data.seq_len))
    rows = rows_per_worker(manifest, "train", dist.num_workers)
    has_validation = manifest.get("splits", {}).get("validation", {}).get("rows", 0) >= dist.num_workers
    try:
        steps_per_epoch, total_steps = plan_steps(stage.train, rows)
    except ValueError as exc:
        raise UserError(f"stage {stage.name}: {exc}") from None
    print(f"[korch] {stage.name}: {stage.task}, {rows} rows per worker x {dist.num_workers} workers, "
          f"{steps_per_epoch} steps/epoch, {total_steps} steps planned, ZeRO-{dist.deepspeed.zero_stage}", flush=True)

    run_name = _ray_run_name(ctx.stage_dir, ctx.fresh_run or bool(ctx.resume_from))
    latest_saved = newest_logged_checkpoint(ctx.stage_dir, run_name)
    log_name = f"korch-log-{os.getpid()}-{time.time_ns()}"
    log = start_run_log(str(ctx.stage_dir), log_name)
    fail_at = os.environ.get(FAIL_ENV)
    loop_config = TrainLoopConfig(
        task=stage.task, options=options.model_dump(mode="json") if options else {},
        task_info=task_cls.data_info(manifest, options), stage_dir=str(ctx.stage_dir), tokenizer_dir=tokenizer_dir,
        prepared_dir=str(Path(prepared).resolve()) if "://" not in str(prepared) else str(prepared),
        manifest=manifest, start_from=ctx.start_from, resume_from=ctx.resume_from,
        latest_saved=str(latest_saved) if latest_saved else None, model=stage.model,
        train=stage.train, eval=stage.eval,
        deepspeed_config=build_deepspeed_config(dist.deepspeed, stage.train, dist.num_workers, dist.use_gpu),
        seq_len=seq_len, rows_per_worker=rows, has_validation=has_validation, use_gpu=dist.use_gpu,
        cpus_per_worker=dist.cpus_per_worker, log_actor=log_name, fail_at_step=int(fail_at) if fail_at else None,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config.model_dump(mode="json"),
        torch_config=build_torch_config(dist),
        scaling_config=build_scaling_config(dist),
        run_config=RunConfig(
            name=run_name,
            storage_path=str((ctx.stage_dir / "ray").resolve()),
            failure_config=build_failure_config(dist),
            checkpoint_config=CheckpointConfig(num_to_keep=stage.train.keep_checkpoints),
            callbacks=list(ctx.extra.get("train_callbacks", [])),  # e.g. a tuning trial's per-epoch reports
        ),
    )
    launch = ctx.extra.get("launch")  # a one-worker tuning trial runs the loop in its own process (korch.tune.trial)
    # A tuning trial shows its progress in Tune's table; a stage of `korch run` gets the live line.
    view = ProgressView(ctx.stage_dir, stage.name, total_steps) if launch is None else None
    if view:
        view.start()
    try:
        if launch is not None and dist.num_workers == 1:
            summary, error = launch(loop_config.model_dump(mode="json")), None
        else:
            result = trainer.fit()
            summary, error = result.return_value, result.error
    except ray.train.TrainingFailedError as exc:  # Train V2 raises what V1 returned in `result.error`
        summary, error = None, exc
    finally:
        ray.kill(log)
        if view:
            view.stop()
    if error:
        cause = describe_failure(error)
        details = write_failure(ctx.stage_dir, error, cause)
        raise StageFailed(f"stage {stage.name} failed after {max(dist.max_failures, 0)} allowed worker failure(s): "
                          f"{cause}; every worker's error is in {details}; checkpoints in "
                          f"{ctx.stage_dir / 'ray'} are kept, run the same command to resume")
    (ctx.stage_dir / FAILURE_FILE).unlink(missing_ok=True)  # an earlier attempt's failure, now resumed past
    summary = summary or {}
    evaluation = summary.get("eval", {"note": "no held-out split large enough to evaluate"})
    (ctx.stage_dir / "eval.json").write_text(json.dumps(evaluation, indent=1, ensure_ascii=False))
    extra = {k: v for k, v in summary.items() if k not in ("step", "loss", "eval")}
    return {"final_step": summary.get("step"), "final_loss": summary.get("loss"), "eval": evaluation, **extra}


def apply_from_checkpoint(ctx: StageContext, path: str) -> None:
    """Point the stage at PATH: a korch checkpoint resumes with full state, an HF folder gives start weights."""
    from korch.train.checkpoint import is_checkpoint

    source = Path(path).expanduser().resolve()
    if source.is_dir() and not is_checkpoint(source) and not (source / "config.json").exists():
        source = latest_checkpoint(source) or source  # a stage or Ray run folder: take its newest checkpoint
    if not source.exists():
        raise UserError(f"--from-checkpoint {path}: no such folder; give a korch checkpoint (state.json) or an "
                        "HF folder such as runs/<job>/<stage>/checkpoint-<step>")
    if is_checkpoint(source):
        ctx.resume_from = str(source)
    elif (source / "config.json").exists():
        ctx.start_from = str(source)
        ctx.fresh_run = True
    else:
        raise UserError(f"--from-checkpoint {path}: neither a korch checkpoint (state.json + safetensors) "
                        "nor a Hugging Face model folder (config.json)")


def newest_logged_checkpoint(stage_dir: Path, run_name: str) -> Path | None:
    """The highest-step checkpoint of Ray run `run_name` that events.jsonl says was written. The loop logs a
    checkpoint only after Ray has stored it, so a folder an interrupted copy left half-written never counts."""
    events = stage_dir / "events.jsonl"
    if not events.is_file():
        return None
    logged = set()
    for line in events.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if event.get("event") == "checkpoint":
            logged.add(event.get("step"))
    return latest_checkpoint(stage_dir / "ray" / run_name, steps=logged)


def latest_checkpoint(folder: Path, steps: set | None = None) -> Path | None:
    """The korch checkpoint with the highest step under a stage folder (`ray/<run>/checkpoint_*`) or a Ray run folder;
    with `steps`, only among checkpoints saved at one of those steps."""
    from korch.train.checkpoint import checkpoint_step, is_checkpoint

    patterns = ("checkpoint_*", "*/checkpoint_*", "ray/*/checkpoint_*")
    candidates = [(checkpoint_step(p), p.stat().st_mtime, p) for pattern in patterns for p in folder.glob(pattern)
                  if is_checkpoint(p)]
    candidates = [c for c in candidates if steps is None or c[0] in steps]
    return max(candidates)[2] if candidates else None
