"""`korch bench tune`: TPE+ASHA against random and grid search at equal compute, on one job and space.

Each method gets the same search window with one trial at a time (so equal wall time is equal compute) and
the same tokenizer (trained once: a per-method tokenizer would add WordPiece's noise to the comparison).
Prints progress lines, then one JSON line:
    {"bench": "tune", "tpe_asha_best": .., "random_best": .., "grid_best": .., "tpe_asha_compute_to_random_best": ..,
     "overhead": ..}
`tpe_asha_compute_to_random_best`: the share of the window TPE+ASHA used until its best first matched random
search's final best (null if it never did). `overhead`: (wall - in-trial time) / wall of the TPE+ASHA search,
in-trial time being Tune's `time_total_s` of each trial (its function's start to its last report).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def compute_to_reach(trials: list, target: float | None, mode: str, began: float, window_s: float) -> float | None:
    """Share of `window_s` from `began` until a finished trial first reached `target` (pure, on study trials)."""
    from korch.tune.study import trial_metric

    if target is None:
        return None
    for trial in sorted((t for t in trials if t.datetime_complete), key=lambda t: t.datetime_complete):
        value = trial_metric(trial)
        if value is not None and (value >= target if mode == "max" else value <= target):
            return round(max(0.0, trial.datetime_complete.timestamp() - began) / window_s, 3)
    return None


def run_bench(args: argparse.Namespace) -> dict:
    import optuna

    from korch.config import load_job
    from korch.train.job import init_local_ray
    from korch.train.runner import StageContext, resolve_tokenizer
    from korch.tasks import TASKS
    from korch.tune.campaign import TuneRequest, pick_stage, run_campaign
    from korch.tune.space import grid_points, load_space
    from korch.tune.study import STUDY_NAME, default_storage, open_storage, trial_metric

    runs = Path(args.runs_dir).resolve()
    job = load_job(args.job, args.set)
    space = load_space(args.space)
    stage = job.stage(pick_stage(job, None))
    import ray

    init_local_ray(2)
    try:
        ctx = StageContext(stage_dir=runs / "shared")
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = resolve_tokenizer(stage, ctx, TASKS[stage.task].load_trainer())
        overrides = [*args.set, f"stages.{stage.name}.tokenizer.path={tokenizer}"]
        results: dict[str, dict] = {}
        for method in ("tpe", "random", "grid"):
            request = TuneRequest(job=args.job, space=args.space, runs_dir=str(runs / method), overrides=overrides,
                                  num_samples=64, max_concurrent=1, time_budget=args.budget, seed=args.seed,
                                  sampler=method, grid=grid_points(space, args.grid_per_range))
            outcome = run_campaign(request)
            campaign = runs / method / job.name / "tune"
            study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(default_storage(campaign)))
            trials = study.get_trials(deepcopy=False)
            values = [v for v in (trial_metric(t) for t in trials) if v is not None]
            best = (max if space.mode == "max" else min)(values) if values else None
            began = min(t.datetime_start.timestamp() for t in trials) if trials else time.time()
            results[method] = {"best": best, "trials": len(trials), "wall": outcome.get("ran_seconds", 0.0),
                               "trial_seconds": outcome.get("trial_seconds", 0.0), "study": trials, "began": began}
            print(f"[bench] {method}: best {best}, {len(trials)} trials, search {outcome.get('ran_seconds')} s, "
                  f"in-trial {outcome.get('trial_seconds')} s", flush=True)
    finally:
        ray.shutdown()
    tpe, rnd = results["tpe"], results["random"]
    window = max(rnd["wall"], 1e-9)
    overhead = (tpe["wall"] - tpe["trial_seconds"]) / tpe["wall"] if tpe["wall"] else None
    return {"bench": "tune", "tpe_asha_best": tpe["best"], "random_best": rnd["best"], "grid_best": results["grid"]["best"],
            "tpe_asha_compute_to_random_best": compute_to_reach(tpe["study"], rnd["best"], space.mode, tpe["began"], window),
            "overhead": None if overhead is None else round(overhead, 3),
            "trials": {m: r["trials"] for m, r in results.items()}, "budget_s": args.budget}


def _cmd(args: argparse.Namespace) -> int:
    print(json.dumps(run_bench(args)))
    return 0


def register(bench) -> None:
    p = bench.add_parser("tune", help="TPE+ASHA vs random vs grid search at equal compute; prints one JSON line")
    p.add_argument("--job", default="jobs/nsmc_tiny.yaml")
    p.add_argument("--space", default="tune_spaces/focal_smoothing_lr.yaml")
    p.add_argument("--budget", type=float, default=150.0, help="seconds per method (search window + outputs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-per-range", type=int, default=2, help="grid values per searched range")
    p.add_argument("--runs-dir", default="runs/bench-tune")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a job field (all methods)")
    p.set_defaults(func=_cmd)
