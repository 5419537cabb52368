"""TensorBoard files read back with TensorBoard's own reader, and MLflow runs on a real tracking server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from korch.config import JobConfig
from korch.train import job as job_module
from korch.train.runlog import RunLog
from test_provenance import stand_in  # noqa: F401 (the fixture)


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_run_log_writes_tensorboard_scalars_that_tensorboard_reads_back(tmp_path):
    log = RunLog(str(tmp_path), echo=False)
    for step in (10, 20):
        log.metrics({"step": step, "epoch": step / 20, "loss": 1.0 / step, "lr": 1e-3, "samples_per_s": 5.0, "time": 0})
    log.evaluation({"step": 20, "epoch": 1.0, "accuracy": 0.5})
    log.flush()
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["loss"] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05))]
    assert scalars["val/accuracy"] == [(20, 0.5)] and "time" not in scalars


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1; skipped with the reason if it cannot start."""
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", str(root / "store"), "--default-artifact-root", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        # A file-backed store starts in seconds where SQLite first runs ~50 schema migrations; clients still
        # talk to it only over the server's REST API.
        env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.skip(f"mlflow server exited with {process.returncode}: {(root / 'server.log').read_text()[-300:]}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(process.pid, 15)
        pytest.skip("mlflow server did not answer /health within 120 s")
    yield url
    os.killpg(process.pid, 15)
    process.wait(timeout=30)


@pytest.mark.slow
def test_each_finished_stage_logs_params_metrics_and_model_to_mlflow(stand_in, mlflow_server, tmp_path):  # noqa: F811
    from mlflow.tracking import MlflowClient

    job = JobConfig.model_validate({"name": "tracked", "tracking": {"mlflow_uri": mlflow_server}, "stages": [
        {"name": "first", "task": "stand_in", "train": {"lr": 2e-3}}]})
    job_module.run_job(job, str(tmp_path))
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["train.lr"] == "0.002" and run.data.tags["korch.stage"] == "first"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [2.0, 1.0, pytest.approx(2 / 3)]
    assert run.data.metrics["eval_accuracy"] == 0.75
    assert [a.path for a in client.list_artifacts(run.info.run_id, "final")] == ["final/config.json"]
    # a skipped stage logs nothing again
    job_module.run_job(job, str(tmp_path))
    assert len(client.search_runs([experiment.experiment_id])) == 1
