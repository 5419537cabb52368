"""`korch submit`'s pure parts as data: runtime_env and its upload size, entrypoint, resources, the token."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from korch.cluster.submit import (
    DEFAULT_EXCLUDES, MAX_UPLOAD_BYTES, build_entrypoint, build_runtime_env, check_address, entrypoint_resources,
    job_metadata, job_path_in_project, measure_upload, read_auth_token, upload_excludes,
)
from korch.config import JobConfig
from korch.errors import UserError

MiB = 2**20


def make_project(root: Path) -> Path:
    """A minimal korch-shaped project with the usual heavy folders next to the code."""
    (root / "src" / "korch").mkdir(parents=True)
    (root / "src" / "korch" / "__init__.py").write_text("")
    (root / "src" / "korch" / "cli.py").write_text("print('hi')\n")
    (root / "jobs").mkdir()
    corpus = root / "corpus.txt"
    corpus.write_text("한국어 문장입니다.\n" * 5, encoding="utf-8")
    (root / "jobs" / "j.yaml").write_text(yaml.safe_dump({"name": "j", "stages": [
        {"name": "mlm", "task": "mlm", "data": {"inputs": [str(corpus)]},
         "distributed": {"num_workers": 6, "use_gpu": True}}]}))
    (root / "pyproject.toml").write_text("[project]\nname='korch'\n")
    for heavy in ("runs/job/mlm/final", "data/raw", ".git/objects", ".venv/lib", "sub/__pycache__"):
        (root / heavy).mkdir(parents=True)
        (root / heavy / "blob.bin").write_bytes(b"x" * MiB)
    return root


def sparse(path: Path, size: int) -> None:
    """A file of `size` bytes that takes no disk (sizes are what Ray would zip, not blocks on disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


# --- upload size and excludes ----------------------------------------------------------------------------

def test_runtime_env_ships_the_project_and_korch(tmp_path):
    root = make_project(tmp_path / "p")
    env = build_runtime_env(root)
    assert env["working_dir"] == str(root.resolve())
    # korch comes from the upload itself; py_modules would lose korch/data to the /data/ exclude.
    assert env["env_vars"]["PYTHONPATH"] == "src" and "py_modules" not in env
    for pattern in ("/runs/", "/data/", ".git/", ".venv/", "__pycache__/"):
        assert pattern in env["excludes"]
    assert "pip" not in env


def test_excludes_leave_only_code_in_the_upload(tmp_path):
    root = make_project(tmp_path / "p")
    size = measure_upload(root, upload_excludes(root))
    files = sorted(path for path, _ in size.largest)
    assert files == ["corpus.txt", "jobs/j.yaml", "pyproject.toml", "src/korch/__init__.py", "src/korch/cli.py"]
    assert size.total_bytes < 10_000


def test_a_virtualenv_with_any_name_is_excluded(tmp_path):
    root = make_project(tmp_path / "p")
    (root / "myenv").mkdir()
    (root / "myenv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    sparse(root / "myenv" / "lib" / "torch.so", 2 * MAX_UPLOAD_BYTES)
    assert "/myenv/" in upload_excludes(root)
    build_runtime_env(root)  # no error: the env is not uploaded


def test_gitignore_is_honoured_like_ray_does(tmp_path):
    root = make_project(tmp_path / "p")
    (root / ".gitignore").write_text("checkpoints/\n*.safetensors\n")
    sparse(root / "checkpoints" / "big.bin", 2 * MAX_UPLOAD_BYTES)
    sparse(root / "notes" / "model.safetensors", 2 * MAX_UPLOAD_BYTES)
    size = measure_upload(root, upload_excludes(root))
    assert size.total_bytes < MiB


def test_over_100_mb_is_refused_before_upload_naming_the_culprit(tmp_path):
    root = make_project(tmp_path / "p")
    sparse(root / "corpora" / "kowiki.jsonl", MAX_UPLOAD_BYTES + MiB)
    with pytest.raises(UserError, match=r"would be 101\.0 MiB .*over Ray's 100\.0 MiB limit \(ray#22043\).*corpora/kowiki\.jsonl"):
        build_runtime_env(root)
    # --exclude fixes it
    assert build_runtime_env(root, extra_excludes=["/corpora/"])["excludes"][-1] == "/corpora/"


def test_submit_cli_exits_2_on_a_big_project_without_contacting_anyone(tmp_path, cli, monkeypatch):
    root = make_project(tmp_path / "p")
    sparse(root / "corpora" / "kowiki.jsonl", MAX_UPLOAD_BYTES + MiB)
    monkeypatch.chdir(root)
    # Port 9 (discard) has no job API: reaching it would fail differently, so exit 2 here proves the check
    # ran before any network call.
    code, out, err = cli("submit", "jobs/j.yaml", "--address", "http://127.0.0.1:9")
    assert code == 2 and "over Ray's 100.0 MiB limit" in err and out == ""


def test_not_a_korch_project(tmp_path):
    with pytest.raises(UserError, match="not the korch project"):
        build_runtime_env(tmp_path)


# --- entrypoint, resources, metadata ---------------------------------------------------------------------

def test_entrypoint_is_korch_run_with_address_auto_and_quoted_overrides():
    entry = build_entrypoint("jobs/quick start.yaml", ["stages.mlm.train.lr=1e-4", "name=a b; rm -rf /"])
    words = shlex.split(entry)
    assert words[:7] == ["python", "-m", "korch.cli", "run", "jobs/quick start.yaml", "--address", "auto"]
    assert words[7:] == ["--set", "stages.mlm.train.lr=1e-4", "--set", "name=a b; rm -rf /"]


def test_job_must_live_in_the_project(tmp_path):
    root = make_project(tmp_path / "p")
    assert job_path_in_project(root / "jobs" / "j.yaml", root) == "jobs/j.yaml"
    outside = tmp_path / "other.yaml"
    outside.write_text("name: x\n")
    with pytest.raises(UserError, match="outside the project"):
        job_path_in_project(outside, root)


def _job(tmp_path) -> JobConfig:
    from korch.config import load_job

    return load_job(make_project(tmp_path / "p") / "jobs" / "j.yaml")


def test_driver_holds_no_gpu_and_stays_on_the_head(tmp_path):
    job = _job(tmp_path)
    assert entrypoint_resources(job) == {"entrypoint_num_cpus": 0, "entrypoint_num_gpus": 0}
    exclusive = entrypoint_resources(job, exclusive=True)
    assert exclusive["entrypoint_resources"] == {"korch_job_slot": 1} and exclusive["entrypoint_num_gpus"] == 0
    assert job_metadata(job) == {"korch_job": "j", "korch_max_gpus": "6", "korch_max_workers": "6"}


def test_cluster_files_offer_the_job_slot():
    repo = Path(__file__).resolve().parents[2]
    for name in ("aws-gpu.yaml", "gcp-gpu.yaml"):
        raw = yaml.safe_load((repo / "cluster" / name).read_text())
        assert raw["available_node_types"][raw["head_node_type"]]["resources"]["korch_job_slot"] == 1
    assert "korch_job_slot" in (repo / "cluster" / "onprem.yaml").read_text()


def test_dry_run_prints_the_submission_without_the_token(tmp_path, cli, monkeypatch):
    root = make_project(tmp_path / "p")
    monkeypatch.chdir(root)
    token = "tok-" + "ab" * 20
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    code, out, err = cli("submit", "jobs/j.yaml", "--address", "http://127.0.0.1:8265", "--dry-run",
                         "--set", "stages.mlm.distributed.num_workers=2")
    assert code == 0, err
    sent = json.loads(out)
    assert sent["entrypoint"] == "python -m korch.cli run jobs/j.yaml --address auto --set stages.mlm.distributed.num_workers=2"
    assert sent["entrypoint_num_gpus"] == 0 and sent["runtime_env"]["working_dir"] == str(root.resolve())
    assert token not in out + err


def test_submit_warns_about_non_loopback_http():
    assert check_address("http://127.0.0.1:8265/")[1] is None
    assert "clear text" in check_address("http://10.1.2.3:8265")[1]
    assert check_address("https://ray.example.com")[1] is None
    with pytest.raises(UserError, match="expected the dashboard's job API"):
        check_address("127.0.0.1:6379")


def test_bad_job_file_is_exit_2(tmp_path, cli, monkeypatch):
    root = make_project(tmp_path / "p")
    monkeypatch.chdir(root)
    (root / "jobs" / "bad.yaml").write_text("name: x\nstages: [{name: a, task: nope}]\n")
    code, _, err = cli("submit", "jobs/bad.yaml", "--address", "http://127.0.0.1:9")
    assert code == 2 and "unknown task 'nope'" in err


def test_no_address_is_a_clear_error(tmp_path, cli, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    code, _, err = cli("status", "raysubmit_x")
    assert code == 2 and "no --address" in err


def test_unreachable_job_api_is_one_line(cli, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 32)
    code, _, err = cli("status", "raysubmit_x", "--address", "http://127.0.0.1:9")
    assert code == 2 and "cannot reach the Ray job API" in err and "Traceback" not in err
    assert "t" * 32 not in err


# --- token lookup ----------------------------------------------------------------------------------------

def test_token_precedence_matches_ray(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-default\n")
    path_file = tmp_path / "tok"
    path_file.write_text("from-path\n")
    assert read_auth_token({"HOME": str(home)}) == "from-default"
    assert read_auth_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(path_file)}) == "from-path"
    assert read_auth_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(path_file),
                            "RAY_AUTH_TOKEN": "from-env"}) == "from-env"
    assert read_auth_token({"HOME": str(tmp_path / "empty")}) is None


def test_a_broken_token_path_is_an_error_not_a_fallback(tmp_path):
    # Ray aborts on an unreadable RAY_AUTH_TOKEN_PATH rather than silently using another token; so does korch.
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH points to"):
        read_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_default_excludes_cover_the_issue_list():
    for must in ("/runs/", "/data/", ".git/", ".venv/", "venv/"):
        assert must in DEFAULT_EXCLUDES


# --- local paths on the cluster --------------------------------------------------------------------------

def test_relative_paths_keep_their_meaning_on_the_cluster(tmp_path):
    from korch.cluster.submit import cluster_path_overrides

    root = make_project(tmp_path / "p")
    (root / "corpora").mkdir()
    raw = {"name": "j", "stages": [
        {"name": "mlm", "data": {"inputs": ["corpora/a.txt", "data/raw", "../shared/wiki", "s3://b/k", "/abs/x"]},
         "tokenizer": {"path": "./tok"}},
        {"name": "ft", "data": {"inputs": ["corpora/a.txt"]}},
    ]}
    overrides, notes = cluster_path_overrides(raw, root, root, upload_excludes(root))
    # Uploaded, relative, URI and absolute paths stay; excluded or outside ones become absolute.
    assert overrides == [
        'stages.mlm.data.inputs=["corpora/a.txt", "%s", "%s", "s3://b/k", "/abs/x"]'
        % (root.resolve() / "data" / "raw", (tmp_path / "shared" / "wiki").resolve()),
    ]
    assert len(notes) == 2 and "excluded" in notes[0] and "outside the project" in notes[1]


def test_paths_are_relative_to_where_korch_submit_runs(tmp_path):
    from korch.cluster.submit import cluster_path_overrides

    root = make_project(tmp_path / "p")
    raw = {"name": "j", "stages": [{"name": "mlm", "data": {"inputs": ["a.txt"]}}]}
    overrides, notes = cluster_path_overrides(raw, root, root / "jobs", upload_excludes(root))
    # Here a.txt means jobs/a.txt; on the cluster the current directory is the project root.
    assert overrides == ['stages.mlm.data.inputs=["jobs/a.txt"]'] and notes == []
