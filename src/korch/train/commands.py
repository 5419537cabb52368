"""CLI commands of the training side: `korch run`, `korch tokenizer train`, `korch bench train`."""

from __future__ import annotations

import argparse
import json


def _cmd_run(args: argparse.Namespace) -> int:
    from korch.config import load_job
    from korch.train.job import check_stage_names, run_job

    job = load_job(args.job, args.set)
    check_stage_names(job, args.stage, args.from_stage)
    if args.verbose:
        import os

        from korch.train.console import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    if args.dry_run:  # what `run_job` would do with the same flags, and the same checks of them
        from pathlib import Path

        from korch.train.plan import plan_job, plan_table
        from korch.train.runner import StageContext, apply_from_checkpoint

        if args.from_checkpoint:
            apply_from_checkpoint(StageContext(stage_dir=Path(args.runs_dir)), args.from_checkpoint)
        start_over = "--fresh" if args.fresh else (f"from {args.from_checkpoint}" if args.from_checkpoint else None)
        plan = plan_job(job, Path(args.runs_dir).resolve() / job.name, args.from_stage)
        print(plan_table(job, plan, only=args.stage or None, start_over=start_over))
        return 0
    summaries = run_job(job, args.runs_dir, address=args.address, fresh=args.fresh,
                        from_checkpoint=args.from_checkpoint, only=args.stage or None, from_stage=args.from_stage)
    for name, summary in summaries.items():
        shown = {k: v for k, v in summary.items() if k != "probe_logits"}
        print(f"[korch] {job.name}/{name}: {json.dumps(shown, ensure_ascii=False)}")
    return 0


def runs_status(target: str) -> int:
    """`korch status RUNS/<job>`: each stage's state (done, stale, partial, not run), step and key metric, judged
    against the job as it was last run (its `job.yaml` there), or against `--job FILE` when given."""
    from pathlib import Path

    from korch.config import load_job
    from korch.errors import UserError
    from korch.train.plan import format_status, job_status, stage_folder_hint

    job_dir = Path(target)
    if hint := stage_folder_hint(job_dir, "status"):  # a stage's own job.yaml would list it as "not run"
        raise UserError(hint)
    if not (job_dir / "job.yaml").is_file():
        raise UserError(f"{target}: not a korch job folder (no job.yaml); give RUNS/<job>, e.g. runs/quickstart")
    job = load_job(str(job_dir / "job.yaml"), [])
    print(f"{job.name} ({job_dir})")
    print(format_status(job_status(job, job_dir)))
    return 0


def _flag(loc: tuple) -> str:
    field = str(loc[0]) if loc else ""
    return "INPUT" if field == "inputs" else "--" + field.replace("_", "-")


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from korch.config import DataConfig, TokenizerConfig
    from korch.errors import UserError

    try:
        data = DataConfig(inputs=args.inputs)
        settings = TokenizerConfig(vocab_size=args.vocab_size, pre_tokenize=args.pre_tokenize,
                                   min_frequency=args.min_frequency, max_docs=args.max_docs)
    except ValidationError as exc:
        # Name the flag (or INPUT) each message is about: pydantic's own loc is the config field.
        raise UserError("; ".join(f"{_flag(e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                                  for e in exc.errors())) from None
    from korch.data.readers import check_output_apart, vocabulary_texts
    from korch.data.tokenizer import train_wordpiece

    check_output_apart(list(data.inputs), args.output)  # a tokenizer.json inside a corpus folder is read as corpus
    train_wordpiece(vocabulary_texts(list(data.inputs), data, settings.max_docs), args.output,
                    vocab_size=settings.vocab_size, min_frequency=settings.min_frequency,
                    pre_tokenize=settings.pre_tokenize)
    print(f"[korch] tokenizer saved to {args.output}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="run a job's stages on Ray (local Ray unless --address)")
    p.add_argument("job", metavar="JOB.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field before validation, e.g. stages.mlm.train.lr=1e-4")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto' for the local node's cluster); default: RAY_ADDRESS, else a new local Ray")
    p.add_argument("--runs-dir", default="runs", help="where outputs go: RUNS/<job>/<stage>/ (default ./runs)")
    p.add_argument("--fresh", action="store_true", help="clear the stages' folders and start over instead of resuming/skipping")
    p.add_argument("--from-checkpoint", default=None, metavar="PATH",
                   help="start the stage(s) from a korch checkpoint or an HF checkpoint-<step>/ folder")
    p.add_argument("--stage", action="append", default=[], metavar="NAME", help="run only this stage (repeatable)")
    p.add_argument("--from-stage", default=None, metavar="NAME",
                   help="run NAME and every stage downstream of it again, even if unchanged")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's and the workers' own output too (by default it goes to RUNS/<job>/logs/)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what each stage would do (skip, resume, run, re-run) and why, and run nothing")
    p.set_defaults(func=_cmd_run)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_cmd", required=True, metavar="CMD")
    p = tok.add_parser("train", help="train a WordPiece tokenizer on a corpus and save it in Hugging Face format")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--pre-tokenize", choices=["whitespace", "morphemes"], default="whitespace")
    p.add_argument("--max-docs", type=int, default=50_000)
    p.set_defaults(func=_cmd_tokenizer_train)


def register_bench(bench) -> None:
    try:
        from korch.train import bench as train_bench
    except ImportError:
        return
    train_bench.register(bench)
