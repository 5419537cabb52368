"""`korch run`: load spec → start or join Ray → run stages in order → write outputs → shut down.

What a re-run does in a runs dir that already holds a stage (korch decides, not Ray), by its `korch.json`
provenance (`korch.train.provenance`):
- the stage finished and its spec, parents' outputs and input files are unchanged: it is skipped, and its
  `final/` feeds later stages;
- any of those changed: it and every stage downstream run again, with one line saying why; the old folder
  is kept as `previous/<stage>/`;
- the stage started but did not finish: it resumes from its latest checkpoint (same step, LR, optimizer
  state and data position), unless fields other than the resume-safe ones changed: then it starts over;
- `--from-stage NAME`: NAME and every stage downstream of it run again;
- `--fresh`: the stage folder is cleared and the stage starts over;
- `--from-checkpoint PATH`: the stage starts from PATH (a korch checkpoint, or an HF `checkpoint-<step>/`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import yaml

from korch.config import JobConfig, StageConfig
from korch.errors import UserError
from korch.tasks import TASKS
from korch.train.console import collect_ray_logs, quiet_before_local_init, quiet_driver_console, verbose
from korch.train.plan import current_provenance, describe_plan, plan_job
from korch.train.provenance import output_hash, read_provenance, write_provenance
from korch.train.retrain import resolve_retrain
from korch.train.runlog import RunLog

SUMMARY = "summary.json"


def stage_is_finished(stage_dir: Path) -> bool:
    return (stage_dir / SUMMARY).is_file()


def local_cpus_needed(job: JobConfig) -> int:
    """Ray counts CPUs logically: leave room for Ray Data readers and Kiwi actors beside the train workers."""
    from korch.data.pool import local_pool_shape

    need = 0.0
    for stage in job.stages:
        dist, pool = stage.distributed, local_pool_shape(stage.data)
        need = max(need, dist.num_workers * dist.cpus_per_worker + pool.actors * pool.actor_cpus + 1)
    return max(os.cpu_count() or 1, int(-(-need // 1)))


def needs_ray(stage: StageConfig, address: str | None) -> bool:
    """Whether `korch run` must have Ray up before this stage. Ray starts at the first stage that needs it and
    stays up. On a machine korch runs alone, a stage its task runs in the driver (a data_prepare stage under 4
    CPUs, vocab_expand) goes first without one: an idle local Ray keeps ~0.06 of a core busy (GCS, raylet,
    agents, idle workers) beside the stage's Kiwi threads, and a job of such stages starts no Ray at all (a
    data-only job on 2 cores: 12.8 s instead of 20-22 s). Joining a cluster (`--address`, RAY_ADDRESS) always
    connects first: the data stage's pool runs on the cluster."""
    if address or os.environ.get("RAY_ADDRESS"):
        return True
    return TASKS[stage.task].needs_ray_locally(stage)


def start_ray(job: JobConfig, address: str | None) -> str | None:
    """Join a cluster when asked (or under `ray job submit`, which sets RAY_ADDRESS); else start a local one.

    Returns "joined", "local", or None when Ray was already initialised by the caller (tests, notebooks).
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if ray.is_initialized():
        return None
    given = "--address" if address else "RAY_ADDRESS"  # name what the user set in any error
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_cluster_address(address, given)
        print(f"[korch] joining the Ray cluster at {address}", flush=True)
        try:
            ray.init(address=address, log_to_driver=verbose())
        except ConnectionError as exc:  # e.g. `auto` with no cluster started on this node
            why = str(exc).splitlines()[0].rstrip(".")
            raise UserError(f"{given} {address}: {why}. Start the cluster first (`ray start --head`), or "
                            f"{_without(given)} to run on a local Ray of korch's own") from None
        quiet_driver_console()
        return "joined"
    cpus = local_cpus_needed(job)
    print(f"[korch] starting a local Ray with {cpus} logical CPUs (machine has {os.cpu_count()})", flush=True)
    init_local_ray(cpus)
    return "local"


def check_cluster_address(address: str, given: str = "--address") -> None:
    """Fail in seconds, with one line, on a `host:port` that nothing answers: Ray itself retries such an address
    for minutes. `auto` and `ray://` addresses are left to Ray."""
    import socket

    if address.startswith(("http://", "https://")):
        raise UserError(f"{given} {address}: that is the Ray job API (what `korch submit` takes); `korch run` "
                        "joins a cluster's GCS: HOST:6379, or auto on a node of the cluster")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"{given} {address}: nothing answers there ({reason}); start the cluster first "
                        f"(`ray start --head` on that node), fix the address, or {_without(given)} to run on a "
                        "local Ray of korch's own") from None


def _without(given: str) -> str:
    return "leave --address out" if given == "--address" else "unset RAY_ADDRESS"


LOCAL_RAY_TRAIN_OFF = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_METRICS_ENABLED")


def init_local_ray(num_cpus: int) -> None:
    """A private embedded Ray (never joins a cluster someone else started here), without the dashboard.

    Ray Train's PlacementGroupCleaner asks the state API whether the controller lives. Without a dashboard of
    our own it auto-detects one, and with another Ray on the machine it can ask the wrong cluster, hear "dead",
    and remove our workers' placement group mid-run. Pointing the state API at a closed port makes that check
    fail safe ("unavailable, keep monitoring"); the embedded cluster is shut down with korch anyway.

    Ray Train's preemption watcher (an actor per run, for spot nodes) and its metrics callbacks (for a
    dashboard this Ray does not run) have nothing to do on one machine: without them a 2-worker stage reaches
    its first step about 2 s sooner (1.7 s of 21 s, 5 runs each way on 2 cores). The user's own setting wins.
    """
    import ray

    from korch.data.pipeline import local_ray_options

    os.environ.setdefault("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    for name in LOCAL_RAY_TRAIN_OFF:
        os.environ.setdefault(name, "0")
    quiet_before_local_init()
    ray.init(**{**local_ray_options(num_cpus), "log_to_driver": verbose()})
    quiet_driver_console()


def _check_resources(stage: StageConfig, korch_started_ray: bool) -> None:
    """Fail fast instead of waiting forever for workers the cluster can never place."""
    from korch.cluster.live import check_stage_fits

    problem = check_stage_fits(stage.distributed, started_ray=korch_started_ray)
    if problem:
        raise UserError(f"stage {stage.name}: {problem}")


def check_stage_names(job: JobConfig, only: list[str] | None = None, from_stage: str | None = None) -> None:
    """`--stage` and `--from-stage` must name stages of the job: an unknown `--stage` would run nothing, exit 0."""
    names = [s.name for s in job.stages]
    for flag, name in [("--from-stage", from_stage), *(("--stage", n) for n in only or ())]:
        if name and name not in names:
            raise UserError(f"{flag} {name}: the job has no such stage; its stages are {', '.join(names)}")


def run_job(job: JobConfig, runs_dir: str, address: str | None = None, fresh: bool = False,
            from_checkpoint: str | None = None, only: list[str] | None = None, from_stage: str | None = None) -> dict:
    from korch.train.runner import StageContext, apply_from_checkpoint

    if from_checkpoint:  # check before any Ray start-up or folder is touched
        apply_from_checkpoint(StageContext(stage_dir=Path(runs_dir)), from_checkpoint)
    check_stage_names(job, only, from_stage)

    job_dir = Path(runs_dir).resolve() / job.name
    plan = {} if (fresh or from_checkpoint) else plan_job(job, job_dir, from_stage)
    for line in describe_plan(job, plan):
        print(f"[korch] {line}", flush=True)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "job.yaml").write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
    ray_mode: str | None = None
    ray_ready = False
    summaries: dict[str, dict] = {}
    try:
        for stage in job.stages:
            if only and stage.name not in only:
                continue
            stage_dir = job_dir / stage.name
            decision = plan.get(stage.name)
            if fresh and stage_dir.exists():
                shutil.rmtree(stage_dir)
            elif decision is not None and decision.action in ("rerun", "restart"):
                _keep_previous(job_dir, stage_dir)
            stage_dir.mkdir(parents=True, exist_ok=True)
            (stage_dir / "job.yaml").write_text(
                yaml.safe_dump({"name": job.name, "stages": [stage.model_dump(mode="json")]}, sort_keys=False, allow_unicode=True))
            events = RunLog(str(stage_dir))
            if decision is not None and decision.action == "skip":
                events.event("skip", reason="finished earlier, and its spec, parents and inputs are unchanged; "
                             "use --from-stage or --fresh to run it again")
                if read_provenance(stage_dir) is None:  # a run from before provenance: record it now
                    write_provenance(stage_dir, {**current_provenance(job, stage.name, job_dir).to_json(),
                                                 "finished": True, "output": output_hash(stage_dir)})
                summaries[stage.name] = json.loads((stage_dir / SUMMARY).read_text())
                continue
            stage = resolve_retrain(job, stage, job_dir)
            write_provenance(stage_dir, current_provenance(job, stage.name, job_dir).to_json())
            if stage is not job.stage(stage.name):  # record what a retrain actually runs
                (stage_dir / "job.yaml").write_text(yaml.safe_dump(
                    {"name": job.name, "stages": [stage.model_dump(mode="json")]}, sort_keys=False, allow_unicode=True))
            ctx = _stage_context(job, job_dir, stage, fresh, from_checkpoint)
            if not ray_ready and needs_ray(stage, address):
                ray_mode, ray_ready = start_ray(job, address), True
            if ray_ready:
                _check_resources(stage, korch_started_ray=ray_mode == "local")
            events.event("start", step=_resume_step(ctx), task=stage.task, workers=stage.distributed.num_workers,
                         resume=_resume_step(ctx) > 0)
            began = time.time()
            summary = TASKS[stage.task].load_runner()(stage, ctx)
            summary = dict(summary or {}, seconds=round(time.time() - began, 1))
            (stage_dir / SUMMARY).write_text(json.dumps(summary, indent=1, ensure_ascii=False))
            write_provenance(stage_dir, {**current_provenance(job, stage.name, job_dir).to_json(),
                                         "finished": True, "output": output_hash(stage_dir)})
            events.event("finish", step=summary.get("final_step"), seconds=summary["seconds"],
                         loss=summary.get("final_loss"))
            _track(job, stage, stage_dir)
            summaries[stage.name] = summary
    finally:
        if ray_mode:
            import ray

            if ray_mode == "local":
                logs = collect_ray_logs(job_dir)
                if logs:
                    print(f"[korch] Ray and worker logs: {logs}", flush=True)
            ray.shutdown()
        _print_embedding_table(job_dir, [s.name for s in job.stages if not only or s.name in only])
    return summaries


def _track(job: JobConfig, stage: StageConfig, stage_dir: Path) -> None:
    """Log the finished stage to MLflow when a server is named; a tracking outage warns and never fails the job."""
    from korch.train.tracking import log_stage_to_mlflow, mlflow_uri

    uri = mlflow_uri(job.tracking.mlflow_uri)
    if not uri:
        return
    try:
        run_id = log_stage_to_mlflow(uri, job.tracking.experiment or job.name, stage_dir, stage.model_dump(mode="json"))
    except Exception as exc:  # noqa: BLE001 (any client or server error)
        print(f"[korch] warning: {stage.name}: MLflow logging to {uri} failed: {type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
        return
    print(f"[korch] {stage.name}: logged to MLflow {uri} (run {run_id})", flush=True)


def _keep_previous(job_dir: Path, stage_dir: Path) -> None:
    """A stage that runs again keeps its last results as `previous/<stage>/` (one generation), so a change that
    turns out worse can be compared against or copied back."""
    if not stage_dir.exists():
        return
    keep = job_dir / "previous" / stage_dir.name
    if keep.exists():
        shutil.rmtree(keep)
    keep.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(stage_dir), str(keep))


def _print_embedding_table(job_dir: Path, names: list[str]) -> None:
    """Embedding stages compared side by side at the end (a regressed one too), as the seed pipeline did."""
    from korch.eval.guard import stage_table

    table = stage_table(job_dir, names)
    if table:
        print("[korch] embedding stages:\n" + table, flush=True)


def _stage_context(job: JobConfig, job_dir: Path, stage: StageConfig, fresh: bool, from_checkpoint: str | None):
    """What the stage starts from: the `needs` stage's model, or its packed data and tokenizer if it prepared data."""
    from korch.train.runner import StageContext, apply_from_checkpoint

    ctx = StageContext(stage_dir=job_dir / stage.name, fresh_run=fresh,
                       needs={name: job_dir / name for name in stage.needed})
    if stage.needed and TASKS[stage.task].trainer:
        needed = job_dir / stage.needed[0]
        if job.stage(stage.needed[0]).task == "data_prepare":
            ctx.extra["prepared_data"] = str(needed / "data")
            # The shards hold that stage's token ids: train with its tokenizer, trained there or given by path.
            prepare = job.stage(stage.needed[0])
            if not stage.tokenizer.path:
                if (needed / "tokenizer" / "tokenizer.json").exists():
                    ctx.tokenizer_dir = str(needed / "tokenizer")
                elif prepare.tokenizer.path:
                    ctx.tokenizer_dir = prepare.tokenizer.path
        elif (needed / stage.start_from / "config.json").exists():
            from korch.eval.guard import promoted_final

            # `final` of a regressed parent is what its guard promoted instead (the parent's parent's model).
            ctx.start_from = promoted_final(needed) if stage.start_from == "final" else str(needed / stage.start_from)
        elif not from_checkpoint:  # --from-checkpoint names the start itself
            raise UserError(f"stage {stage.name} needs '{stage.needed[0]}', but {needed / stage.start_from} holds no "
                            f"model; run stage {stage.needed[0]} first, pick another start_from, or give "
                            "--from-checkpoint")
    if from_checkpoint:
        apply_from_checkpoint(ctx, from_checkpoint)
    return ctx


def _resume_step(ctx) -> int:
    """The step the stage will continue from: an explicit checkpoint's, else its current Ray run's newest, else 0."""
    from korch.train.checkpoint import checkpoint_step
    from korch.train.runner import RUN_STATE, latest_checkpoint

    source = None
    if ctx.resume_from:
        source = Path(ctx.resume_from)
    elif not ctx.fresh_run and (ctx.stage_dir / RUN_STATE).exists():
        run_name = json.loads((ctx.stage_dir / RUN_STATE).read_text())["ray_run_name"]
        source = latest_checkpoint(ctx.stage_dir / "ray" / run_name)
    if source is None or not (source / "state.json").exists():
        return 0
    return checkpoint_step(source)
