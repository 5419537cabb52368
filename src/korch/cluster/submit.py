"""`korch submit` and friends: a job YAML to a Ray job, over the Ray Job Submission SDK.

    korch submit jobs/quickstart.yaml --address http://127.0.0.1:8265 --follow

The address is the dashboard's job API, reached through an SSH tunnel or `kubectl port-forward` (the cluster
files bind it to 127.0.0.1: whoever reaches it can run code on the cluster). Ray's token auth stays on;
korch reads the token the way Ray does and sends it as a bearer header. The pure builders
(`build_runtime_env`, `build_entrypoint`, `entrypoint_resources`, `read_auth_token`) are tested as data.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping
from urllib.parse import urlparse

from korch.config import is_uri
from korch.errors import UserError

# Ray stores working_dir packages in the GCS, and big packages fail or crawl (ray#22043); korch refuses
# before zipping anything so the user sees what to exclude instead of a gRPC error.
MAX_UPLOAD_BYTES = 100 * 1024 * 1024

# Run outputs, data and environments never belong in the upload: outputs live on the cluster's storage, data
# comes from shared storage or URIs, and the cluster has its own Python. Patterns are gitignore-style, as
# Ray's `excludes` are; a leading `/` anchors them at the project root.
DEFAULT_EXCLUDES = (
    "/runs/", "/data/", "/scratch/", ".git/", ".venv/", "venv/", ".tox/", ".nox/", "__pycache__/",
    "*.egg-info/", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", "/build/", "/dist/", "node_modules/",
    ".ipynb_checkpoints/",
)

# Where Ray looks for the token when RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH are unset.
DEFAULT_TOKEN_PATH = "~/.ray/auth_token"


# --- runtime_env -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UploadSize:
    total_bytes: int
    files: int
    largest: list[tuple[str, int]]
    """The biggest files that would be uploaded, largest first (relative paths)."""


def _pathspec(patterns: Iterable[str]):
    try:  # the copy Ray itself matches `excludes` with, so korch and Ray agree on every pattern
        from ray._private.thirdparty.pathspec import PathSpec
    except ImportError:  # pragma: no cover - Ray moved its vendored copy
        from pathspec import PathSpec
    return PathSpec.from_lines("gitwildmatch", list(patterns))


def upload_excludes(project_dir: str | os.PathLike, extra: Iterable[str] = ()) -> list[str]:
    """DEFAULT_EXCLUDES, any virtualenv found by its `pyvenv.cfg` (whatever its name), then `extra`."""
    root = Path(project_dir)
    known = _pathspec(DEFAULT_EXCLUDES)
    found = [f"/{cfg.parent.name}/" for cfg in sorted(root.glob("*/pyvenv.cfg"))
             if not known.match_file(cfg.parent.name + "/")]
    return list(DEFAULT_EXCLUDES) + found + list(extra)


def measure_upload(project_dir: str | os.PathLike, excludes: Iterable[str]) -> UploadSize:
    """Bytes Ray would upload for `working_dir=project_dir` with these excludes.

    Like Ray, `.gitignore` and `.rayignore` files found while walking also exclude paths below them.
    """
    root = Path(project_dir).resolve()
    spec = _pathspec(excludes)
    total, count, sizes = 0, 0, []

    def walk(directory: Path, ignores: list) -> None:
        nonlocal total, count
        local = list(ignores)
        for name in (".gitignore", ".rayignore"):
            ignore_file = directory / name
            if ignore_file.is_file():
                lines = ignore_file.read_text(encoding="utf-8", errors="replace").splitlines()
                local.append((directory, _pathspec(lines)))
        for entry in sorted(directory.iterdir()):
            rel = entry.relative_to(root).as_posix()
            suffix = "/" if entry.is_dir() and not entry.is_symlink() else ""
            if spec.match_file(rel + suffix) or spec.match_file(rel):
                continue
            if any(ps.match_file(entry.relative_to(base).as_posix() + suffix) for base, ps in local):
                continue
            if suffix:
                walk(entry, local)
            elif entry.is_file():
                size = entry.stat().st_size
                total += size
                count += 1
                sizes.append((rel, size))

    walk(root, [])
    sizes.sort(key=lambda item: -item[1])
    return UploadSize(total, count, sizes[:5])


def build_runtime_env(project_dir: str | os.PathLike, *, extra_excludes: Iterable[str] = (),
                      env_vars: Mapping[str, str] | None = None, pip: Iterable[str] = (),
                      max_bytes: int = MAX_UPLOAD_BYTES) -> dict:
    """The runtime_env for a korch job: the project as working_dir, with its `src/` on PYTHONPATH.

    Every process of the job (the driver and each Ray Train worker, on any node) starts in the unpacked
    working_dir, so `PYTHONPATH=src` makes the submitted korch importable ahead of whatever korch the cluster
    image has: the cluster always runs the code you submitted. (Python makes relative PYTHONPATH entries
    absolute at start-up, so a later chdir does not lose it.) Not `py_modules`: Ray applies `excludes` to
    py_modules too, and `/data/` would strip the korch.data package. Dependencies (torch, transformers,
    deepspeed...) come from the cluster image / setup_commands; `pip` adds packages in a per-job virtualenv,
    for clusters with internet. Raises UserError, before anything is zipped, when the upload would exceed
    `max_bytes`.
    """
    root = Path(project_dir).resolve()
    if not root.is_dir():
        raise UserError(f"project folder {root} does not exist")
    if not (root / "src" / "korch" / "__init__.py").is_file():
        raise UserError(f"{root} is not the korch project (no src/korch/__init__.py); run korch submit "
                        "from the project root or pass --project-dir")
    excludes = upload_excludes(root, extra_excludes)
    size = measure_upload(root, excludes)
    if size.total_bytes > max_bytes:
        biggest = ", ".join(f"{path} ({_mib(n)})" for path, n in size.largest)
        raise UserError(f"the working_dir upload would be {_mib(size.total_bytes)} ({size.files} files), over "
                        f"Ray's {_mib(max_bytes)} limit (ray#22043); largest: {biggest}. Move data and outputs "
                        "out of the project (or under runs/ or data/), or add patterns with --exclude")
    env: dict = {"working_dir": str(root), "excludes": excludes,
                 "env_vars": {"PYTHONPATH": "src", **dict(env_vars or {})}}
    if pip := list(pip):
        env["pip"] = pip
    return env


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# --- entrypoint ------------------------------------------------------------------------------------------

def build_entrypoint(job_path: str, overrides: Iterable[str] = (), extra_args: Iterable[str] = ()) -> str:
    """`python -m korch.cli run JOB --address auto --set ...`, shell-quoted.

    This is `korch run JOB --address auto`, spelled so it needs no `korch` script on the cluster's PATH: the
    korch package comes from the uploaded project (`PYTHONPATH=src` in the runtime_env). `job_path` is relative to the project root,
    which is the job's working directory on the cluster.
    """
    words = ["python", "-m", "korch.cli", "run", job_path, "--address", "auto"]
    for item in overrides:
        words += ["--set", item]
    words += list(extra_args)
    return shlex.join(words)


def job_path_in_project(job_path: str | os.PathLike, project_dir: str | os.PathLike) -> str:
    """The job file's path relative to the project (the working_dir), or a UserError if it lies outside."""
    job = Path(job_path).resolve()
    root = Path(project_dir).resolve()
    if not job.is_file():
        raise UserError(f"{job_path}: job file does not exist")
    try:
        return job.relative_to(root).as_posix()
    except ValueError:
        raise UserError(f"{job_path} is outside the project {root}, so it would not be uploaded; "
                        "put it under jobs/") from None


def cluster_path_overrides(raw: dict, project_dir: str | os.PathLike, cwd: str | os.PathLike,
                           excludes: Iterable[str]) -> tuple[list[str], list[str]]:
    """`--set` overrides that keep a job's local paths meaning the same thing on the cluster.

    korch resolves relative paths (data.inputs, tokenizer.path, model.pretrained) against the current
    directory; on the cluster that is the uploaded project. A relative path that lands outside the project
    or in an excluded folder (data/, runs/) is not uploaded, so it is sent as the absolute path it has here,
    which must then exist on the cluster too (a shared filesystem). Returns (overrides, notes for the user).
    """
    root, cwd = Path(project_dir).resolve(), Path(cwd).resolve()
    spec = _pathspec(excludes)
    overrides, notes = [], []

    def remap(value: str, where: str) -> str:
        if not isinstance(value, str) or is_uri(value) or value.startswith("~") or os.path.isabs(value):
            return value
        here = Path(os.path.normpath(cwd / value))
        try:
            rel = here.relative_to(root).as_posix()
        except ValueError:
            notes.append(f"{where} {value} is outside the project: sent as {here}, which must exist on the cluster")
            return str(here)
        if spec.match_file(rel) or spec.match_file(rel + "/"):
            notes.append(f"{where} {value} is not uploaded (excluded): sent as {here}, which must exist on the cluster")
            return str(here)
        return value if os.path.normpath(value) == rel else rel

    for stage in raw.get("stages") or []:
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str):
            continue
        name = stage["name"]
        data = stage.get("data") or {}
        inputs = data.get("inputs") if isinstance(data, dict) else None
        if isinstance(inputs, list) and inputs:
            mapped = [remap(v, f"stages.{name}.data.inputs:") for v in inputs]
            if mapped != inputs:
                overrides.append(f"stages.{name}.data.inputs={json.dumps(mapped, ensure_ascii=False)}")
        for section, key in (("tokenizer", "path"), ("model", "pretrained")):
            block = stage.get(section) or {}
            value = block.get(key) if isinstance(block, dict) else None
            if isinstance(value, str) and (value.startswith(".") or os.path.exists(cwd / value)):
                mapped = remap(value, f"stages.{name}.{section}.{key}:")
                if mapped != value:
                    overrides.append(f"stages.{name}.{section}.{key}={json.dumps(mapped, ensure_ascii=False)}")
    return overrides, notes


# Job slot resource: opt-in with `korch submit --exclusive`; the cluster files declare one on the head.
JOB_SLOT_RESOURCE = "korch_job_slot"


def entrypoint_resources(job, exclusive: bool = False) -> dict:
    """Keyword arguments for `JobSubmissionClient.submit_job` that say what the job's driver holds.

    The driver only coordinates: each stage's workers reserve their own CPUs/GPUs as one placement group,
    which is also what the autoscaler scales for. So the driver asks for nothing, and Ray then pins it to the
    head node, which is on-demand (GPU workers may be spot and vanish) and never idles a GPU that a stage's
    gang needs. Ray's job queue cannot tell a 6-GPU stage from a 1-GPU trial (ray#41241): every submitted job
    starts at once and gangs can starve each other. `exclusive=True` asks for the head's single
    `korch_job_slot` resource, so korch jobs run one at a time and the rest wait in PENDING.
    The stage sizes still travel in the job metadata (see `job_metadata`) for `korch status`.
    """
    kwargs: dict = {"entrypoint_num_cpus": 0, "entrypoint_num_gpus": 0}
    if exclusive:
        kwargs["entrypoint_resources"] = {JOB_SLOT_RESOURCE: 1}
    return kwargs


def job_metadata(job) -> dict[str, str]:
    """Metadata shown by `korch status`/`ray job list`: the job name and its largest gang."""
    gpus = max((s.distributed.num_workers * s.distributed.gpus_per_worker if s.distributed.use_gpu else 0)
               for s in job.stages)
    workers = max(s.distributed.num_workers for s in job.stages)
    return {"korch_job": job.name, "korch_max_gpus": f"{gpus:g}", "korch_max_workers": str(workers)}


# --- auth ------------------------------------------------------------------------------------------------

def read_auth_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The Ray auth token, found as Ray finds it: `RAY_AUTH_TOKEN`, else the file at `RAY_AUTH_TOKEN_PATH`,
    else `~/.ray/auth_token`. None when there is none (the cluster may have auth off)."""
    environ = os.environ if environ is None else environ
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise UserError(f"RAY_AUTH_TOKEN_PATH points to {file}, which does not exist; fix the path or unset it")
        return file.read_text(encoding="utf-8").strip() or None
    home = environ.get("HOME")
    default = Path(home, ".ray", "auth_token") if home else Path(DEFAULT_TOKEN_PATH).expanduser()
    if default.is_file():
        return default.read_text(encoding="utf-8").strip() or None
    return None


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Replace each secret in `text` by `***`: error messages from HTTP libraries can echo headers."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def check_address(address: str) -> tuple[str, str | None]:
    """Validate the job API address; returns (address, warning or None)."""
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"--address {address!r}: expected the dashboard's job API, e.g. http://127.0.0.1:8265 "
                        "(through an SSH tunnel or kubectl port-forward; see docs/cluster.md)")
    warning = None
    if parsed.scheme == "http" and parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        warning = (f"{parsed.hostname} is not loopback: the auth token crosses the network in clear text. "
                   "Reach the job API through a tunnel (ray dashboard / ssh -L / kubectl port-forward)")
    return address.rstrip("/"), warning


# --- the SDK calls ---------------------------------------------------------------------------------------

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def make_client(address: str, environ: Mapping[str, str] | None = None):
    """A `JobSubmissionClient` carrying the auth token (when there is one) as a bearer header.

    Ray's SDK only attaches the token itself when RAY_AUTH_MODE=token is set in the client's environment;
    korch sends it whenever it finds one, so `korch submit` works against a token-auth cluster without it.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address, _ = check_address(address)
    token = read_auth_token(environ)
    try:
        return JobSubmissionClient(address, headers=auth_headers(token))
    except AuthenticationError as exc:
        raise UserError(_auth_message(address, token, exc)) from None
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray job API at {address} ({redact(str(exc), [token])}); is the "
                        "tunnel up? e.g. `ray dashboard cluster/aws-gpu.yaml` or "
                        "`ssh -L 8265:127.0.0.1:8265 HEAD`") from None


def _auth_message(address: str, token: str | None, exc: Exception) -> str:
    if token is None:
        return (f"{address} requires Ray's auth token and none was found: set RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH, or copy the cluster's token to ~/.ray/auth_token (see docs/cluster.md)")
    return f"{address} rejected the auth token (it is not this cluster's token); fetch the cluster's token " \
           "with `ray get-auth-token` on the head (see docs/cluster.md)"


def call(address: str, what: Callable, environ: Mapping[str, str] | None = None):
    """Run `what(client)` and turn auth/connection/unknown-job errors into one-line UserErrors."""
    from ray.exceptions import AuthenticationError

    token = read_auth_token(environ)
    client = make_client(address, environ)
    try:
        return what(client)
    except AuthenticationError as exc:
        raise UserError(_auth_message(address, token, exc)) from None
    except RuntimeError as exc:
        message = redact(str(exc), [token])
        if "does not exist" in message or "404" in message:
            raise UserError(f"no such job on {address}: {message.splitlines()[0][:300]}") from None
        raise UserError(f"the Ray job API at {address} failed: {message.splitlines()[0][:300]}") from None


def submit(address: str, *, entrypoint: str, runtime_env: dict, metadata: dict, resources: dict,
           submission_id: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    return call(address, lambda c: c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                                metadata=metadata, submission_id=submission_id, **resources),
                environ)


def status(address: str, job_id: str, environ: Mapping[str, str] | None = None):
    """The job's `JobDetails` (status, message, entrypoint, metadata, start/end times)."""
    return call(address, lambda c: c.get_job_info(job_id), environ)


def logs(address: str, job_id: str, environ: Mapping[str, str] | None = None) -> str:
    return call(address, lambda c: c.get_job_logs(job_id), environ)


def stop(address: str, job_id: str, environ: Mapping[str, str] | None = None) -> bool:
    return call(address, lambda c: c.stop_job(job_id), environ)


def follow(address: str, job_id: str, out=None, environ: Mapping[str, str] | None = None) -> str:
    """Stream the job's logs to `out` until it ends; returns the final status name."""
    import asyncio

    out = out or sys.stdout

    async def tail(client) -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    def run(client) -> str:
        try:
            asyncio.run(tail(client))
        except RuntimeError:
            # The websocket can close early (head restart, tunnel hiccup); the status below is still right.
            pass
        import time

        while True:
            state = str(client.get_job_status(job_id).value)
            if state in TERMINAL:
                return state
            time.sleep(1)

    return call(address, run, environ)


def exit_code_for(state: str) -> int:
    """`--follow` exits 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED."""
    return 0 if state == "SUCCEEDED" else 1
