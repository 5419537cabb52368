"""CLI: `korch submit | status | logs | stop | plan`. Registered by `korch.cli` when this module exists."""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

from korch.errors import UserError

ADDRESS_HELP = ("the Ray job API, e.g. http://127.0.0.1:8265 through a tunnel (default: $RAY_API_SERVER_ADDRESS, "
                "then $RAY_ADDRESS if it is an http URL)")


def register(sub) -> None:
    p = sub.add_parser("submit", help="submit a job YAML to a Ray cluster (ray job submit, with korch's runtime_env)",
                       description="Upload the project (minus runs/, data/, .git, virtualenvs) and run "
                                   "`korch run JOB --address auto` as a Ray job. Reads Ray's auth token from "
                                   "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.")
    p.add_argument("job", metavar="JOB.yaml")
    _address(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, passed on to korch run, e.g. stages.mlm.train.lr=1e-4")
    p.add_argument("--follow", action="store_true", help="stream the logs and exit with the job's status")
    p.add_argument("--runs-dir", default=None, metavar="PATH",
                   help="passed to korch run: where outputs go on the cluster. Use shared storage (e.g. "
                        "/mnt/shared/runs); the default runs/ sits in the job's temporary working_dir")
    p.add_argument("--project-dir", default=".", help="the folder uploaded as working_dir (default: .)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="another gitignore-style pattern to leave out of the upload")
    p.add_argument("--exclusive", action="store_true",
                   help="hold the head's korch_job_slot so korch jobs run one at a time (ray#41241)")
    p.add_argument("--submission-id", default=None, help="choose the job's submission id")
    p.add_argument("--dry-run", action="store_true", help="print the submission instead of sending it")
    p.set_defaults(func=cmd_submit)

    for name, func, text in (("status", cmd_status, "show a submitted job's status, or the stages of RUNS/<job>"),
                             ("logs", cmd_logs, "print a submitted job's logs"),
                             ("stop", cmd_stop, "stop a submitted job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id", metavar="ID", help="the submission id korch submit printed" +
                       (", or a runs folder RUNS/<job>" if name == "status" else ""))
        _address(p)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
        p.set_defaults(func=func)

    p = sub.add_parser("plan", help="per-stage workers/GPUs/CPUs, and which node types of a cluster can host them",
                       description="Exits 2 when a stage's worker gang cannot fit any node type of the cluster "
                                   "or its max_workers.")
    p.add_argument("job", metavar="JOB.yaml")
    p.add_argument("--cluster", default=None, metavar="CLUSTER.yaml",
                   help="a cluster-launcher YAML or KubeRay manifest, e.g. cluster/onprem.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    p.set_defaults(func=cmd_plan)


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help=ADDRESS_HELP)


def _resolve_address(value: str | None) -> str:
    if value:
        return value
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        env = os.environ.get(var, "")
        if env.startswith(("http://", "https://")):
            return env
    raise UserError("no --address: give the Ray job API, e.g. --address http://127.0.0.1:8265 "
                    "(open a tunnel first; see docs/cluster.md)")


# --- plan ------------------------------------------------------------------------------------------------

def cmd_plan(args) -> int:
    from korch.cluster import plan
    from korch.config import load_job

    job = load_job(args.job, args.set)
    if args.cluster:
        cluster = plan.load_cluster_yaml(args.cluster)
        types = plan.node_types(cluster)
        plans = plan.plan_job(job, types, plan.cluster_max_workers(cluster))
    else:
        plans = plan.plan_job(job, None)
    print(plan.format_plan_table(plans))
    errors = [p.error for p in plans if p.error]
    if errors:
        raise UserError("\n".join(f"{args.cluster}: {e}" for e in errors))
    return 0


# --- submit / status / logs / stop -----------------------------------------------------------------------

def _load_for_submit(path: str, overrides: list[str]):
    """The validated job, or (when only local paths are missing) a stand-in with each stage's distributed.

    Data paths in a job may exist only on the cluster (a shared mount), so a missing local path is a warning
    here; korch run validates again on the cluster.
    """
    from korch.config import DistributedConfig, SpecError, load_job, load_raw

    try:
        return load_job(path, overrides)
    except SpecError as exc:
        missing = ("does not exist" in p or "matches no file" in p for p in exc.problems)
        if not all(missing) or "file does not exist; give the path" in str(exc):
            raise
        for problem in exc.problems:
            print(f"korch: warning: {exc.path}: {problem} (checked again on the cluster)", file=sys.stderr)
    raw = load_raw(path, overrides)
    stages = [SimpleNamespace(name=s.get("name"), distributed=DistributedConfig.model_validate(s.get("distributed") or {}))
              for s in raw.get("stages") or [] if isinstance(s, dict)]
    return SimpleNamespace(name=raw.get("name"), stages=stages)


def cmd_submit(args) -> int:
    from korch.cluster import submit
    from korch.config import load_raw

    address, warning = submit.check_address(_resolve_address(args.address))
    if warning:
        print(f"korch: warning: {warning}", file=sys.stderr)
    job = _load_for_submit(args.job, args.set)
    job_rel = submit.job_path_in_project(args.job, args.project_dir)
    runtime_env = submit.build_runtime_env(args.project_dir, extra_excludes=args.exclude)
    path_sets, notes = submit.cluster_path_overrides(load_raw(args.job, args.set), args.project_dir, os.getcwd(),
                                                     runtime_env["excludes"])
    for note in notes:
        print(f"korch: note: {note}", file=sys.stderr)
    entrypoint = submit.build_entrypoint(job_rel, [*args.set, *path_sets],
                                         ["--runs-dir", args.runs_dir] if args.runs_dir else [])
    resources = submit.entrypoint_resources(job, exclusive=args.exclusive)
    metadata = submit.job_metadata(job)
    if args.dry_run:
        import json

        print(json.dumps({"address": address, "entrypoint": entrypoint, "runtime_env": runtime_env,
                          "metadata": metadata, **resources}, indent=2))
        return 0
    job_id = submit.submit(address, entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata,
                           resources=resources, submission_id=args.submission_id)
    print(job_id)
    sys.stdout.flush()
    if not args.follow:
        print(f"korch: follow with `korch logs {job_id} --follow --address {address}`", file=sys.stderr)
        return 0
    state = submit.follow(address, job_id)
    print(f"korch: job {job_id} {state}", file=sys.stderr)
    return submit.exit_code_for(state)


def cmd_status(args) -> int:
    from korch.cluster import submit

    if os.path.isdir(args.job_id):  # `korch status RUNS/<job>`: the stages of a runs folder, no cluster needed
        from korch.train.commands import runs_status

        return runs_status(args.job_id)
    if os.sep in args.job_id:  # a path, not a job ID (Ray's submission IDs have no slash: they go in URLs)
        raise UserError(f"{args.job_id}: no such runs folder; give RUNS/<job> (e.g. runs/quickstart), or a "
                        "submitted job's ID with --address")

    info = submit.status(_resolve_address(args.address), args.job_id)
    state = str(getattr(info.status, "value", info.status))
    print(f"{args.job_id}: {state}")
    if info.message:
        print(f"  message: {info.message}")
    print(f"  entrypoint: {info.entrypoint}")
    for key, value in sorted((info.metadata or {}).items()):
        print(f"  {key}: {value}")
    return 0


def cmd_logs(args) -> int:
    from korch.cluster import submit

    address = _resolve_address(args.address)
    if args.follow:
        return submit.exit_code_for(submit.follow(address, args.job_id))
    sys.stdout.write(submit.logs(address, args.job_id))
    return 0


def cmd_stop(args) -> int:
    from korch.cluster import submit

    stopped = submit.stop(_resolve_address(args.address), args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0
