"""Against real Ray: a local head with token auth (korch submit, plain `ray job submit`, fail-fast check),
and a fake 2-node cluster whose worker declares 6 GPUs (gang placement of a 6-worker GPU stage)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "quickstart.yaml"

# Ray's own websocket log tail trips an aiohttp deprecation; not korch's to fix.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")]

needs_quickstart = pytest.mark.skipif(not QUICKSTART.exists(), reason="jobs/quickstart.yaml (the lead's) is not there yet")

# Keep the quickstart short (6 steps on 150 documents): this tests submission, not training quality. On a 2-CPU head, 2 workers x 1 CPU
# would leave no CPU for Ray Data's read tasks (they deadlock), so the workers take half a CPU each.
SHORT = ["--set", "stages.mlm.train.max_steps=6", "--set", "stages.mlm.train.checkpoint_every_steps=3",
         "--set", "stages.mlm.distributed.cpus_per_worker=0.5", "--set", "stages.mlm.data.max_docs=150",
         "--set", "stages.mlm.tokenizer.vocab_size=3000"]


def _final_outputs(runs: Path) -> list[str]:
    stage = runs / "quickstart" / "mlm"
    return sorted(p.name for p in stage.iterdir()) if stage.is_dir() else []


def _assert_outputs(runs: Path) -> None:
    stage = runs / "quickstart" / "mlm"
    assert (stage / "summary.json").is_file(), _final_outputs(runs)
    final = stage / "final"
    assert final.is_dir() and any(final.glob("*.safetensors")), _final_outputs(runs)


@needs_quickstart
def test_korch_submit_follow_quickstart_succeeds(ray_head, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    for key, value in ray_head.env.items():
        if key.startswith("RAY_"):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # korch sends the token itself; no client-side mode needed
    runs = tmp_path / "runs"
    code, out, err = cli("submit", "jobs/quickstart.yaml", "--address", ray_head.address, "--follow",
                         "--runs-dir", str(runs), *SHORT)
    assert code == 0, f"{out[-4000:]}\n{err[-3000:]}"
    job_id = out.splitlines()[0].strip()
    assert job_id.startswith("raysubmit_")
    assert "SUCCEEDED" in err
    _assert_outputs(runs)
    assert ray_head.token not in out + err

    code, out2, _ = cli("status", job_id, "--address", ray_head.address)
    assert code == 0 and f"{job_id}: SUCCEEDED" in out2 and "korch_job: quickstart" in out2
    code, logs, _ = cli("logs", job_id, "--address", ray_head.address)
    assert code == 0 and "[korch]" in logs
    assert ray_head.token not in out2 + logs


def test_wrong_or_missing_token_is_a_clear_error(ray_head, cli, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token to fall back on
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    code, _, err = cli("status", "raysubmit_nope", "--address", ray_head.address)
    assert code == 2 and "requires Ray's auth token and none was found" in err
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong-token-" + "0" * 20)
    code, _, err = cli("status", "raysubmit_nope", "--address", ray_head.address)
    assert code == 2 and "rejected the auth token" in err and "wrong-token" not in err


def test_unknown_job_id(ray_head, cli, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    code, _, err = cli("status", "raysubmit_nope", "--address", ray_head.address)
    assert code == 2 and "no such job" in err


@needs_quickstart
def test_plain_ray_job_submit_works_the_same(ray_head, tmp_path):
    # The documented plain path: korch is installed on the cluster (here: this venv, first on the head's PATH).
    runs = tmp_path / "runs"
    env = dict(ray_head.env)  # RAY_AUTH_MODE=token + RAY_AUTH_TOKEN: what `ray job submit` needs
    data = json.dumps([str((REPO / "../shared/data/kowiki_sample").resolve()),
                       str((REPO / "../shared/data/korean_petitions").resolve())])
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_head.address,
           "--working-dir", ".", "--", "korch", "run", "jobs/quickstart.yaml", "--address", "auto",
           "--runs-dir", str(runs), "--set", f"stages.mlm.data.inputs={data}", *SHORT]
    result = run_bounded(cmd, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    _assert_outputs(runs)


def test_plain_ray_job_submit_without_token_is_refused(ray_head, tmp_path):
    env = {k: v for k, v in ray_head.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(tmp_path)  # no default token file either
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "list", "--address", ray_head.address]
    result = run_bounded(cmd, env=env, timeout=120)
    assert result.returncode != 0
    assert "Authentication" in result.stdout + result.stderr


def run_bounded(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in its own process group, all of which is killed at the timeout. (A plain run's timeout
    kills only the child, then waits on pipes its children still hold open: a stuck job hung a CI run.)"""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} ... still running after {timeout:.0f} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _run_in_driver(head, code: str) -> str:
    """Run Python as a driver connected to the head (a subprocess, so this test process stays Ray-free)."""
    result = run_bounded([sys.executable, "-c", code], env=head.env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_live_check_fails_fast_on_a_hand_started_head(ray_head):
    code = f"""
import ray, json
ray.init(address={ray_head.gcs_address!r}, logging_level="ERROR")
from korch.config import DistributedConfig
from korch.cluster.live import autoscaler_node_groups, check_stage_fits
print(json.dumps({{"groups": autoscaler_node_groups() , "gpu": check_stage_fits(DistributedConfig(num_workers=6, use_gpu=True)),
                  "cpu": check_stage_fits(DistributedConfig(num_workers=2))}}, default=str))
"""
    got = json.loads(_run_in_driver(ray_head, code))
    assert got["groups"] == []  # nothing launched these nodes, so nothing will join
    assert "needs 6 workers x (1 CPU + 1 GPU)" in got["gpu"] and "does not autoscale" in got["gpu"]
    assert got["cpu"] is None


def test_submitted_korch_wins_over_the_installed_one(ray_head, tmp_path):
    # korch is installed in this venv (the "cluster image"); the job must still run the uploaded copy, in the
    # driver and in Ray workers alike. The uploaded korch here is a stub that says where it was loaded from.
    import time

    from korch.cluster import submit

    project = tmp_path / "proj"
    (project / "src" / "korch").mkdir(parents=True)
    (project / "src" / "korch" / "__init__.py").write_text("UPLOADED = True\n")
    (project / "probe.py").write_text(
        "import ray, korch\n"
        "ray.init(address='auto', logging_level='ERROR')\n"
        "@ray.remote(num_cpus=0)\n"
        "def worker_sees():\n"
        "    import os, korch\n"
        "    os.chdir('/')  # a later chdir must not lose the import path\n"
        "    import importlib; importlib.reload(korch)\n"
        "    return getattr(korch, 'UPLOADED', False)\n"
        "print('DRIVER', getattr(korch, 'UPLOADED', False), 'WORKER', ray.get(worker_sees.remote()))\n")
    env = {"RAY_AUTH_TOKEN": ray_head.token}
    job_id = submit.submit(ray_head.address, entrypoint="python probe.py", runtime_env=submit.build_runtime_env(project),
                           metadata={}, resources=submit.entrypoint_resources(None), environ=env)
    deadline = time.time() + 120
    while str(submit.status(ray_head.address, job_id, environ=env).status.value) not in submit.TERMINAL:
        assert time.time() < deadline
        time.sleep(1)
    assert "DRIVER True WORKER True" in submit.logs(ray_head.address, job_id, environ=env)


def test_exclusive_jobs_queue_instead_of_running_together(ray_head, tmp_path):
    # ray#41241: Ray starts every submitted job at once. With the head's single korch_job_slot, a second
    # --exclusive job waits in PENDING until the first ends. (A sleep stands in for `korch run`.)
    import time
    from types import SimpleNamespace

    from korch.cluster import submit

    env = {"RAY_AUTH_TOKEN": ray_head.token}
    job = SimpleNamespace(name="q", stages=[])
    resources = submit.entrypoint_resources(job, exclusive=True)
    first = submit.submit(ray_head.address, entrypoint="sleep 8", runtime_env={}, metadata={}, resources=resources,
                          environ=env)
    second = submit.submit(ray_head.address, entrypoint="echo second", runtime_env={}, metadata={},
                           resources=resources, environ=env)

    def state(job_id):
        return str(submit.status(ray_head.address, job_id, environ=env).status.value)

    deadline = time.time() + 60
    while state(first) != "RUNNING" and time.time() < deadline:
        time.sleep(0.5)
    assert state(first) == "RUNNING"
    assert state(second) == "PENDING"
    deadline = time.time() + 120
    while state(second) not in submit.TERMINAL and time.time() < deadline:
        time.sleep(1)
    assert state(first) == "SUCCEEDED" and state(second) == "SUCCEEDED"


def test_korch_stop_stops_a_running_job(ray_head, cli, monkeypatch):
    # A sleep stands in for `korch run`: what is tested is that `korch stop` ends a running job.
    import time

    from korch.cluster import submit

    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    job_id = submit.submit(ray_head.address, entrypoint="sleep 300", runtime_env={}, metadata={}, resources={})

    def state():
        return str(submit.status(ray_head.address, job_id).status.value)

    deadline = time.time() + 60
    while state() != "RUNNING" and time.time() < deadline:
        time.sleep(0.5)
    assert state() == "RUNNING"
    code, out, err = cli("stop", job_id, "--address", ray_head.address)
    assert code == 0 and out.strip() == f"{job_id}: stop requested", err
    deadline = time.time() + 60
    while state() not in submit.TERMINAL and time.time() < deadline:
        time.sleep(0.5)
    assert state() == "STOPPED"
    code, out, _ = cli("status", job_id, "--address", ray_head.address)
    assert code == 0 and f"{job_id}: STOPPED" in out
    code, out, _ = cli("stop", job_id, "--address", ray_head.address)
    assert code == 0 and out.strip() == f"{job_id}: already finished"


def _run_wires_the_live_check() -> bool:
    import inspect

    try:
        from korch.train import job
    except ImportError:
        return False
    return "check_stage_fits" in inspect.getsource(job)


@needs_quickstart
@pytest.mark.skipif(not _run_wires_the_live_check(),
                    reason="korch run does not call korch.cluster.live.check_stage_fits yet (lead's wiring)")
def test_korch_run_fails_fast_when_the_gang_can_never_fit(ray_head, cli, monkeypatch):
    import time

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    code, out, err = cli("submit", "jobs/quickstart.yaml", "--address", ray_head.address,
                         "--set", "stages.mlm.distributed.use_gpu=true", "--set", "stages.mlm.distributed.num_workers=6")
    assert code == 0, err
    job_id = out.splitlines()[0].strip()
    from korch.cluster import submit

    deadline = time.time() + 240
    state = None
    while time.time() < deadline:
        state = str(submit.status(ray_head.address, job_id).status.value)
        if state in submit.TERMINAL:
            break
        time.sleep(2)
    if state not in submit.TERMINAL:
        submit.stop(ray_head.address, job_id)
    assert state == "FAILED", f"a 6-GPU stage on a GPU-less fixed cluster should fail fast, got {state}"
    assert "needs 6 workers" in submit.logs(ray_head.address, job_id)


# --- fake multi-node cluster -----------------------------------------------------------------------------

def test_six_worker_gpu_stage_lands_on_the_6_gpu_node(tmp_path):
    # Ray only counts GPUs, so a node that *declares* 6 GPUs is enough to test placement. korch's own job runs
    # there through run_job: a data_prepare stage (no Kiwi, the fixture corpus) hands its shards and tokenizer
    # to a 6-worker `use_gpu: true` mlm stage whose workers find no CUDA and fall back to CPU on gloo.
    # A subprocess, so the fake cluster's ray.init does not leak into other tests.
    script = tmp_path / "fake_cluster.py"
    script.write_text(FAKE_CLUSTER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    corpus = REPO / "tests" / "fixtures" / "data" / "corpus"
    result = run_bounded([sys.executable, str(script), str(corpus), str(tmp_path / "runs")], env=env, timeout=900,
                         cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # The script's report is its last JSON line (korch's own progress lines come before it).
    reports = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert reports, result.stdout[-2000:]
    got = json.loads(reports[-1])
    assert got["live_check"] is None and got["live_check_7"] is not None
    stage = tmp_path / "runs" / "fake6" / "mlm"
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["final_step"] == 3
    events = [json.loads(line) for line in (stage / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[0]["workers"] == 6 and events[-1]["event"] == "finish"
    from korch.train.checkpoint import read_checkpoint
    from korch.train.runner import latest_checkpoint

    assert read_checkpoint(latest_checkpoint(stage))[2]["world_size"] == 6
    assert (stage / "final" / "model.safetensors").is_file() and (stage / "final" / "tokenizer.json").is_file()
    # Placement: every training worker ran on the node that declares the GPUs (and, finding no CUDA there,
    # trained on CPU: a worker that tried CUDA would have failed the stage).
    workers = got["workers"]
    assert len(workers) == 6 and {w["node"] for w in workers} == {got["gpu_node"]}, workers


FAKE_CLUSTER_SCRIPT = r"""
import json, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster

corpus, runs = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
gpu_node = cluster.add_node(num_cpus=6, num_gpus=6)
cluster.wait_for_nodes()
try:
    ray.init(address=cluster.address, logging_level="ERROR")
    from korch.cluster.live import check_stage_fits
    from korch.config import DistributedConfig, load_job
    from korch.train.job import run_job

    live_check = check_stage_fits(DistributedConfig(num_workers=6, use_gpu=True))
    live_check_7 = check_stage_fits(DistributedConfig(num_workers=7, use_gpu=True))
    job = Path(runs).parent / "fake6.yaml"
    job.write_text(json.dumps({"name": "fake6", "stages": [
        {"name": "prepare", "task": "data_prepare", "tokenizer": {"vocab_size": 300, "min_frequency": 1},
         "data": {"inputs": [corpus], "seq_len": 16, "split_sentences": False, "min_doc_chars": 0,
                  "validation_fraction": 0.0, "preprocess_actors": 1, "actor_cpus": 0.5}},
        {"name": "mlm", "task": "mlm", "needs": "prepare",
         "train": {"max_steps": 3, "micro_batch_size": 1, "checkpoint_every_steps": 2, "log_every_steps": 1},
         "eval": {"every": "never"},
         "distributed": {"num_workers": 6, "use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 1,
                         "backend": "gloo", "deepspeed": {"zero_stage": 2, "precision": "fp32"}}},
    ]}))
    run_job(load_job(job), runs)
    # Ray keeps dead actors' records: where did korch's training workers run, and did they see CUDA?
    from ray.util.state import list_actors

    workers = [{"node": a["node_id"]}
               for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=100)]
    print(json.dumps({"workers": workers, "gpu_node": gpu_node.node_id, "live_check": live_check,
                      "live_check_7": live_check_7}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""
