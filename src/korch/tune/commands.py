"""CLI of tuning campaigns: `korch tune` and `korch bench tune`."""

from __future__ import annotations

import argparse
import json
import time


def _cmd_tune(args: argparse.Namespace) -> int:
    from korch.tune.campaign import TuneRequest, run_campaign
    from korch.tune.deadline import parse_deadline
    from korch.tune.handoff import parse_then

    started = time.time()
    parse_then(args.then)  # a typo fails before anything starts
    request = TuneRequest(
        job=args.job, space=args.space, runs_dir=args.runs_dir, stage=args.stage, overrides=args.set,
        num_samples=args.num_samples, max_concurrent=args.max_concurrent,
        deadline=parse_deadline(args.deadline) if args.deadline else None, time_budget=args.time_budget,
        reserve=args.reserve, resume=args.resume, storage=args.storage, seed=args.seed, then=args.then,
        started=started)
    outcome = run_campaign(request)
    print(f"[korch] tune: {json.dumps(outcome, ensure_ascii=False, default=str)}")
    return 0


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def register(sub) -> None:
    p = sub.add_parser("tune", help="a deadline-aware tuning campaign (Ray Tune + Optuna TPE + ASHA) over one stage")
    p.add_argument("job", metavar="JOB.yaml")
    p.add_argument("--space", required=True, metavar="FILE", help="search space, e.g. tune_spaces/focal_smoothing_lr.yaml")
    p.add_argument("--stage", default=None, metavar="NAME", help="the stage to tune (default: the job's one trained stage)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a job field first")
    p.add_argument("--num-samples", type=_positive(int), default=8, metavar="N",
                   help="trials in the campaign in total (on --resume: a larger N adds trials)")
    p.add_argument("--max-concurrent", type=_positive(int), default=2, metavar="K", help="trials running at once")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--deadline", default=None, metavar="ISO8601", help="when everything must be done")
    when.add_argument("--time-budget", type=_positive(float), default=None, metavar="SECONDS",
                      help="seconds from now until everything must be done")
    p.add_argument("--reserve", type=float, default=0.0, metavar="SECONDS",
                   help="seconds kept after the search for --then (retrain, ensemble)")
    p.add_argument("--then", action="append", default=[], metavar="WHAT",
                   help="after the search: retrain:best and/or ensemble:topK (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the campaign in RUNS/<job>/tune/")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna study storage (default sqlite in the campaign folder), e.g. postgresql://u@host:5432/db")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--runs-dir", default="runs", help="outputs go to RUNS/<job>/tune/ (default ./runs)")
    p.set_defaults(func=_cmd_tune)


def register_bench(bench) -> None:
    from korch.tune import bench as tune_bench

    tune_bench.register(bench)
