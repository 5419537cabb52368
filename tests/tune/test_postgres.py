"""The campaign's study on a real PostgreSQL server started here (initdb + pg_ctl on a free port, run as the
`postgres` user when the tests run as root): a crashed session's RUNNING trial is closed on resume, counts and
the leaderboard read back, and a second "session" continues the same study. Skipped, with the reason, where no
server can be started."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution

from korch.tune.study import build_leaderboard, close_running, done_count, open_storage, sqlalchemy_url

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; under root, run its tools as the `postgres` user.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed (korch's `postgres` or `test` extra)")
    tools = {name: shutil.which(name) for name in ("initdb", "pg_ctl")}
    if not all(tools.values()):
        pytest.skip(f"no PostgreSQL server binaries on PATH ({', '.join(k for k, v in tools.items() if not v)})")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.skip("running as root without runuser: PostgreSQL will not start as root")
    root = Path(tempfile.mkdtemp(prefix="korch-pg-"))
    data, port = root / "data", _free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        root.chmod(0o700)
    try:
        subprocess.run(_as_postgres([tools["initdb"], "-D", str(data), "-U", "postgres", "--auth=trust"]),
                       check=True, capture_output=True, timeout=120)
        subprocess.run(_as_postgres([tools["pg_ctl"], "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60",
                                     "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"]),
                       check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {exc}; {log[-300:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([tools["pg_ctl"], "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_a_plain_postgresql_url_uses_psycopg_3_unless_psycopg2_is_there():
    assert sqlalchemy_url("postgresql://u@h:5432/db", have_psycopg2=False) == "postgresql+psycopg://u@h:5432/db"
    assert sqlalchemy_url("postgresql://u@h:5432/db", have_psycopg2=True) == "postgresql://u@h:5432/db"
    assert sqlalchemy_url("postgresql+psycopg2://u@h/db", have_psycopg2=False) == "postgresql+psycopg2://u@h/db"
    assert sqlalchemy_url("sqlite:////tmp/s.db", have_psycopg2=False) == "sqlite:////tmp/s.db"


def test_the_study_survives_a_crash_and_a_resume_on_postgres(postgres_url):
    dist = {"train.lr": FloatDistribution(1e-5, 1e-3, log=True)}
    # Session 1: two trials finish, a third is running (one epoch reported) when the driver dies.
    study = optuna.create_study(study_name="korch", storage=open_storage(postgres_url), direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0))
    for value in (0.71, 0.78):
        trial = study.ask(dist)
        trial.report(value, 1)
        study.tell(trial, value)
    study.ask(dist).report(0.74, 1)

    # Session 2, a new connection: close what the crash left RUNNING, then carry on with the same study.
    resumed = optuna.create_study(study_name="korch", storage=open_storage(postgres_url), direction="maximize",
                                  load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=1000))
    assert close_running(resumed, "interrupted") == [2]
    trials = resumed.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"] and done_count(trials) == 3
    trial = resumed.ask(dist)  # TPE sees the earlier trials: the new one is number 3
    resumed.tell(trial, 0.80)
    board = build_leaderboard(resumed.get_trials(deepcopy=False), "max", max_epochs=1)
    assert [row["trial_id"] for row in board][:2] == [3, 1] and len(board) == 4


def test_an_unreachable_server_is_one_line():
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed (korch's `postgres` or `test` extra)")
    from korch.errors import UserError

    with pytest.raises(UserError, match="cannot open the study storage"):
        open_storage(f"postgresql://postgres@127.0.0.1:{_free_port()}/postgres")  # nothing listens there
