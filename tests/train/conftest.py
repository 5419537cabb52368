"""The quickstart run, shared by every test module here that needs prepared data, a tokenizer or checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from korch_runs import korch


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory) -> Path:
    """`korch run jobs/quickstart.yaml` (2 workers, ZeRO-2, 200 steps); returns runs/quickstart/mlm.

    KORCH_TEST_QUICKSTART=RUNS/quickstart/mlm reuses a finished run instead (for iterating on one test; the
    tests only add a `skip` event to it)."""
    if os.environ.get("KORCH_TEST_QUICKSTART"):
        return Path(os.environ["KORCH_TEST_QUICKSTART"]).resolve()
    runs = tmp_path_factory.mktemp("runs")
    done = korch("run", "jobs/quickstart.yaml", "--runs-dir", str(runs), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return runs / "quickstart" / "mlm"
