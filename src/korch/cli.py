"""The `korch` command line. Each subcommand returns an exit code; `UserError` becomes one line and exit 2."""

from __future__ import annotations

import argparse
import sys

from korch.errors import StageFailed, UserError


def _cmd_validate(args: argparse.Namespace) -> int:
    from korch.config import SpecError, load_job

    failed = False
    for path in args.jobs:
        try:
            job = load_job(path, args.set)
        except SpecError as exc:
            failed = True
            for problem in exc.problems:
                print(f"{exc.path}: {problem}", file=sys.stderr)
        else:
            print(f"{path}: ok ({len(job.stages)} stage{'s' if len(job.stages) != 1 else ''}: "
                  f"{', '.join(s.name + '/' + s.task for s in job.stages)})")
    return 2 if failed else 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from korch.tasks import TASKS

    for task in TASKS.values():
        print(f"{task.name:14s} {task.description}")
        if task.options is not None:
            print(f"{'':14s} options (stage section `{task.name}:`):")
            for name, field in task.options.model_fields.items():
                default = "required" if field.is_required() else repr(field.default)
                print(f"{'':16s}{name} = {default}: {(field.description or '').splitlines()[0] if field.description else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="korch", description="Train Korean NLP encoders on Ray + DeepSpeed from a job YAML.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check job YAMLs without starting Ray")
    p.add_argument("jobs", nargs="+", metavar="JOB.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. stages.mlm.train.lr=1e-4")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("tasks", help="list the tasks a stage can run")
    p.set_defaults(func=_cmd_tasks)

    from korch.train import commands as train_commands

    train_commands.register(sub)
    bench = sub.add_parser("bench", help="benchmarks that print one JSON line").add_subparsers(dest="bench", required=True, metavar="BENCH")
    train_commands.register_bench(bench)
    from korch.models import bench as model_bench

    model_bench.register(bench)
    for module in ("korch.data.commands", "korch.cluster.commands", "korch.predict", "korch.report",
                   "korch.tune.commands", "korch.eval.commands"):
        _register_optional(module, sub, bench)
    return parser


def _register_optional(module_name: str, sub, bench) -> None:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return
    module.register(sub)
    if hasattr(module, "register_bench"):
        module.register_bench(bench)


def _terminate(signum, frame):
    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C, so `finally` blocks shut Ray down and no output is
    # left half-written; checkpoints already taken stay valid for the next `korch run`.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        for line in str(exc).splitlines() or ["error"]:
            print(f"korch: error: {line}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(f"korch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("korch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
