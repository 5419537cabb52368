"""`korch tune`: a deadline-aware tuning campaign over one stage of a job.

Reads top to bottom: load job + space → window → campaign folder (new, or `--resume`) → Ray → tokenizer and
data prepared once → the study (trials left RUNNING are closed) → Ray Tune with OptunaSearch (TPE, seeded)
and ASHA until the window closes or the trials are done → leaderboard.csv, best.yaml, plots → hand-off.

Outputs in RUNS/<job>/tune/: campaign.json, study.db, leaderboard.csv, progress.txt, best.yaml,
plots/*.{html,png}, trials/trial-NNN/ (each a stage folder: final/, best/, metrics.jsonl, ...), ray/.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from korch.errors import UserError

CAMPAIGN = "campaign.json"


@dataclass
class TuneRequest:
    """The `korch tune` command line, as plain data."""

    job: str
    space: str
    runs_dir: str = "runs"
    stage: str | None = None
    overrides: list[str] = field(default_factory=list)
    num_samples: int = 8
    max_concurrent: int = 2
    deadline: float | None = None
    time_budget: float | None = None
    reserve: float = 0.0
    resume: bool = False
    storage: str | None = None
    seed: int = 0
    then: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    sampler: str = "tpe"
    """`tpe` (with ASHA), `random` or `grid` (both without early stopping): the bench compares them."""
    grid: list[dict] | None = None


def pick_stage(job, requested: str | None) -> str:
    from korch.tasks import TASKS

    if requested:
        if requested not in [s.name for s in job.stages]:
            raise UserError(f"--stage {requested}: no such stage; stages: {', '.join(s.name for s in job.stages)}")
        return requested
    trained = [s.name for s in job.stages if TASKS[s.task].trainer and not s.retrained_from]
    if len(trained) != 1:
        raise UserError(f"the job has {len(trained)} trained stages ({', '.join(trained) or 'none'}); name the one to "
                        "tune with --stage NAME")
    return trained[0]


def check_tunable(stage, space) -> None:
    """Per-epoch metrics are what ASHA and the deadline's graceful stop work with: insist on them."""
    if stage.eval.every != "epoch":
        raise UserError(f"stage {stage.name}: eval.every is {stage.eval.every!r}; tuning compares trials per epoch, "
                        f"so set it to epoch (--set stages.{stage.name}.eval.every=epoch)")
    if not stage.train.epochs:
        raise UserError(f"stage {stage.name}: set train.epochs (ASHA's rungs are epochs)")
    if stage.needed:
        raise UserError(f"stage {stage.name} needs {stage.needed}; tune a stage that starts on its own")


def max_epochs(stage) -> int:
    return int(stage.train.epochs)


def run_campaign(req: TuneRequest) -> dict:
    from korch.config import load_job, load_raw
    from korch.tune.deadline import build_window
    from korch.tune.space import check_space, load_space

    window = build_window(req.started, req.deadline, req.time_budget, req.reserve)
    job = load_job(req.job, req.overrides)
    space = load_space(req.space)
    stage_name = pick_stage(job, req.stage)
    problems = check_space(space, req.job, stage_name, req.space, req.overrides)
    if problems:
        raise UserError("\n".join(problems))
    campaign_dir = Path(req.runs_dir).resolve() / job.name / "tune"
    state = _open_campaign(campaign_dir, req, stage_name, space)
    raw = load_raw(req.job, req.overrides)
    from korch.tune.space import apply_params
    from korch.config import JobConfig

    stage = JobConfig.model_validate(apply_params(raw, stage_name, space.fixed)).stage(stage_name)
    check_tunable(stage, space)

    ray_started = _start_ray(job, stage, req.max_concurrent)
    try:
        shared = _prepare_once(stage, campaign_dir, space)
        # Trials run in Tune's working folders: they get the validated job, whose paths are already absolute.
        setup = {"campaign_dir": str(campaign_dir), "raw_job": job.model_dump(mode="json"), "stage": stage_name,
                 "fixed": space.fixed,
                 "metric": space.metric, **shared}
        outcome = _search(req, space, stage, setup, campaign_dir, window, state)
        outputs = write_outputs(campaign_dir, space, max_epochs(stage), raw, job.name, stage_name, state["storage"])
        outcome.update(outputs)
        if req.then:
            from korch.tune.handoff import run_handoffs

            outcome["then"] = run_handoffs(req.then, campaign_dir, outputs["leaderboard_rows"], raw, stage_name,
                                           space, req.runs_dir, window.deadline)
        outcome.pop("leaderboard_rows", None)
        return outcome
    finally:
        if ray_started:
            import ray

            ray.shutdown()


def _open_campaign(campaign_dir: Path, req: TuneRequest, stage_name: str, space) -> dict:
    """A new campaign writes campaign.json; `--resume` needs one. The study location never changes mid-campaign."""
    from korch.tune.study import default_storage, open_storage

    record = campaign_dir / CAMPAIGN
    if record.exists() and not req.resume:
        raise UserError(f"{campaign_dir} already holds a campaign; add --resume to continue it (more trials with a "
                        "larger --num-samples), or remove the folder to start over")
    if req.resume:
        if not record.exists():
            raise UserError(f"--resume: no campaign in {campaign_dir}; run without --resume to start one")
        state = json.loads(record.read_text())
        if state["stage"] != stage_name or state["space"] != space.model_dump(mode="json"):
            raise UserError(f"--resume: {campaign_dir} tunes stage {state['stage']} over another space; resume with "
                            "the same --space and --stage, or start a new campaign in another --runs-dir")
        if req.storage and req.storage != state["storage"]:
            raise UserError(f"--resume: the campaign's study lives in {state['storage']}, not {req.storage}; "
                            "drop --storage or give that URL")
        state["sessions"] += 1
    else:
        if req.storage:  # a URL that cannot be opened fails now: recorded in campaign.json, no rerun could fix it
            open_storage(req.storage)
        campaign_dir.mkdir(parents=True, exist_ok=True)
        state = {"stage": stage_name, "space": space.model_dump(mode="json"), "seed": req.seed, "sessions": 1,
                 "storage": req.storage or default_storage(campaign_dir), "sampler": req.sampler}
    state["num_samples"] = req.num_samples
    record.write_text(json.dumps(state, indent=1))
    return state


def _start_ray(job, stage, max_concurrent: int) -> bool:
    """A private local Ray big enough (in logical CPUs) for `max_concurrent` trials side by side."""
    import ray

    from korch.train.job import init_local_ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if ray.is_initialized():
        return False
    from korch.data.pool import local_pool_shape

    dist, pool = stage.distributed, local_pool_shape(stage.data)
    need = max_concurrent * dist.num_workers * dist.cpus_per_worker + pool.actors * pool.actor_cpus + 1
    init_local_ray(max(os.cpu_count() or 1, math.ceil(need)))
    return True


def _prepare_once(stage, campaign_dir: Path, space) -> dict:
    """Tokenizer and data for every trial, made here once, unless the space changes what they depend on."""
    from korch.tasks import TASKS
    from korch.train.runner import StageContext, resolve_tokenizer

    if any(path.split(".")[0] in ("data", "tokenizer") for path in space.searched):
        return {}  # each trial prepares its own
    ctx = StageContext(stage_dir=campaign_dir / "prepared")
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    task_cls = TASKS[stage.task].load_trainer()
    tokenizer_dir = resolve_tokenizer(stage, ctx, task_cls)
    prepared = task_cls.prepare_data(stage, ctx, tokenizer_dir)
    return {"tokenizer_dir": str(Path(tokenizer_dir).resolve()), "prepared_data": str(Path(prepared).resolve())}


def _search(req: TuneRequest, space, stage, setup: dict, campaign_dir: Path, window, state: dict) -> dict:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from korch.tune.progress import Progress, WindowStopper
    from korch.tune.space import build_search_space
    from korch.tune.study import STUDY_NAME, close_running, done_count, open_storage
    from korch.tune.trial import DeadlineOptunaSearch, FixedPointsSearch, run_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(state["storage"])
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True,
                                direction="maximize" if space.mode == "max" else "minimize")
    closed = close_running(study, "interrupted")  # a crashed or killed session's trials
    done = done_count(study.get_trials(deepcopy=False))
    remaining = req.num_samples - done
    print(f"[korch] tune: {done} trial(s) done, {remaining} to run, search window {window.search_end - time.time():.0f} s"
          + (f"; closed {len(closed)} trial(s) left running: {closed}" if closed else ""), flush=True)
    if remaining <= 0:
        return {"done_before": done, "ran": 0, "closed": closed}
    # A new sampler seed per session: the same seed would replay the first session's random start-up points.
    seed = int(state["seed"]) + 1000 * (int(state["sessions"]) - 1)
    if req.sampler == "grid":
        searcher = FixedPointsSearch(list(req.grid or []), study, space.metric, space.mode, skip=done)
        scheduler = FIFOScheduler()
    else:
        sampler = (optuna.samplers.TPESampler(seed=seed, n_startup_trials=space.startup_trials) if req.sampler == "tpe"
                   else optuna.samplers.RandomSampler(seed=seed))
        searcher = DeadlineOptunaSearch(space=build_search_space(space), metric=space.metric, mode=space.mode,
                                        sampler=sampler, study_name=STUDY_NAME, storage=storage,
                                        search_end=window.search_end)
        scheduler = (ASHAScheduler(max_t=max_epochs(stage), grace_period=space.asha.grace_period,
                                   reduction_factor=space.asha.reduction_factor)
                     if req.sampler == "tpe" else FIFOScheduler())
    progress = Progress(campaign_dir, study, space.mode, max_epochs(stage), window.search_end)
    tuner = tune.Tuner(
        # A one-worker trial trains in the trial's own process, which then needs the worker's CPUs; a bigger
        # one only waits on its nested Ray Train run, which reserves the workers' resources itself.
        tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                            {"cpu": stage.distributed.cpus_per_worker if stage.distributed.num_workers == 1 else 0.01}),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, metric=space.metric, mode=space.mode,
                                    num_samples=remaining, max_concurrent_trials=req.max_concurrent),
        run_config=tune.RunConfig(name=f"session-{state['sessions']}", storage_path=str(campaign_dir / "ray"),
                                  stop=WindowStopper(window.search_end), callbacks=[progress], verbose=0),
    )
    began = time.time()
    trial_seconds = 0.0
    try:
        grid = tuner.fit()
        # Tune's own clock of each trial's function (start to its last report): the in-trial time.
        trial_seconds = sum(float((r.metrics or {}).get("time_total_s", 0.0)) for r in grid)
    finally:
        # Trials still running at the window's end (or on Ctrl-C) keep the last epoch they reported.
        late = close_running(study, "deadline" if time.time() >= window.search_end - 1 else "interrupted")
        progress.refresh(final=True)
    return {"done_before": done, "ran_seconds": round(time.time() - began, 1), "trial_seconds": round(trial_seconds, 1),
            "stopped_at_window_end": late,
            "refused_for_time": bool(getattr(searcher, "refused", False))}


def write_outputs(campaign_dir: Path, space, epochs: int, raw_job: dict, job_name: str, stage_name: str,
                  storage_url: str) -> dict:
    """leaderboard.csv, best.yaml and plots from the study (so they are right after any session, even a crashed one)."""
    import optuna

    from korch.tune.plots import write_plots
    from korch.tune.space import apply_params
    from korch.tune.study import STUDY_NAME, build_leaderboard, open_storage, ranked, write_leaderboard

    study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(storage_url))
    rows = build_leaderboard(study.get_trials(deepcopy=False), space.mode, epochs)
    write_leaderboard(rows, campaign_dir / "leaderboard.csv")
    result: dict[str, Any] = {"trials": len(rows), "leaderboard": str(campaign_dir / "leaderboard.csv"),
                              "leaderboard_rows": rows}
    good = ranked(rows)
    if good:
        best = good[0]
        best_raw = apply_params(raw_job, stage_name, {**space.fixed, **json.loads(best["params"])})
        header = (f"# best.yaml: {job_name} with the best params of its tuning campaign (trial {best['trial_id']}, "
                  f"{space.metric} {best['metric']:.4f}).\n#   korch run {campaign_dir / 'best.yaml'}\n")
        (campaign_dir / "best.yaml").write_text(header + yaml.safe_dump(best_raw, sort_keys=False, allow_unicode=True))
        result.update(best_trial=best["trial_id"], best_metric=best["metric"], best_params=json.loads(best["params"]),
                      best_yaml=str(campaign_dir / "best.yaml"))
    result["plots"] = write_plots(study, campaign_dir / "plots")
    return result
