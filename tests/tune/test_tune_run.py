"""One real campaign, as a user runs it: `korch tune` is SIGKILLed after 2 trials finish, `--resume` completes
the asked trials without rerunning those 2, and a larger `--num-samples` on `--resume` adds one. Tiny sizes:
800 reviews, 2 epochs, a 1,000-token vocabulary, one trial at a time."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["--set", "stages.classify.data.max_docs=800", "--set", "stages.classify.train.epochs=2",
        "--set", "stages.classify.tokenizer.vocab_size=1000", "--set", "stages.classify.train.warmup_steps=2"]


def korch_tune(runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "korch.cli", "tune", "jobs/nsmc_tiny.yaml", "--space",
            "tune_spaces/focal_smoothing_lr.yaml", "--max-concurrent", "1", "--time-budget", "400",
            "--runs-dir", str(runs), *TINY, *extra]


def trials(campaign: Path) -> list:
    study = optuna.load_study(study_name="korch", storage=f"sqlite:///{campaign / 'study.db'}")
    return study.get_trials(deepcopy=False)


def completed_while_running(campaign: Path) -> int:
    """Finished trials, read without Optuna: opening an RDBStorage creates or migrates the schema, and doing that
    while the running `korch tune` creates it races it (`UNIQUE constraint failed: alembic_version`)."""
    import sqlite3

    if not (campaign / "study.db").exists():
        return 0
    try:
        with sqlite3.connect(f"file:{campaign / 'study.db'}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not there yet, or the file is locked for a moment
        return 0


@pytest.mark.slow
def test_kill_resume_extend(tmp_path):
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    campaign = tmp_path / "nsmc-tiny" / "tune"
    first = subprocess.Popen(korch_tune(tmp_path, "--num-samples", "3"), cwd=REPO, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if completed_while_running(campaign) >= 2:
                break
            time.sleep(1)
        else:
            pytest.fail("2 trials did not finish within 300 s")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver, its Ray and the running trial, like a lost terminal
        first.wait()
    before = {t.number: (t.params, t.datetime_start) for t in trials(campaign) if t.state.name == "COMPLETE"}
    assert len(before) == 2

    done = subprocess.run(korch_tune(tmp_path, "--num-samples", "3", "--resume"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    after = trials(campaign)
    assert all(t.state.name in ("COMPLETE", "PRUNED", "FAIL") for t in after)  # nothing left RUNNING
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in after) >= 3
    for number, (params, started) in before.items():  # the first 2 were kept, not run again
        assert (after[number].params, after[number].datetime_start) == (params, started)
    assert not any(t.params == before[n][0] for t in after for n in before if t.number != n)

    extended = subprocess.run(korch_tune(tmp_path, "--num-samples", "4", "--resume"), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=400)
    assert extended.returncode == 0, extended.stderr[-3000:]
    states = [(t.number, t.state.name, t.user_attrs.get("stopped")) for t in trials(campaign)]
    assert sum(state in ("COMPLETE", "PRUNED") for _, state, _ in states) >= 4, \
        f"{states}\n{done.stdout[-2000:]}\n{extended.stdout[-3000:]}\n{extended.stderr[-3000:]}"

    with open(campaign / "leaderboard.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(trials(campaign)) and rows[0]["metric"]
    check = subprocess.run([sys.executable, "-m", "korch.cli", "validate", str(campaign / "best.yaml")], cwd=REPO,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert (campaign / "plots" / "optimization_history.png").exists()
