"""The campaign's memory: an Optuna study in RDB storage (SQLite in the campaign folder, or PostgreSQL).

The study, not Ray Tune's experiment state, is what a resumed campaign continues from. Every `korch tune`
session runs a fresh Tune experiment whose OptunaSearch loads the same study, so TPE sees every earlier
trial, a larger `--num-samples` simply asks for more, and finished trials are never run again (Ray's own
restore can't add trials, ray#42221, and has lost the searcher's state, ray#30861). Trials a crash or the
window's end left RUNNING are closed here: with their last reported value kept when they reported one.
"""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

STUDY_NAME = "korch"
DONE = ("COMPLETE", "PRUNED")
"""Trial states that count towards `--num-samples` (they hold a result)."""


def default_storage(campaign_dir: Path) -> str:
    return f"sqlite:///{(campaign_dir / 'study.db').resolve()}"


def sqlalchemy_url(url: str, have_psycopg2: bool) -> str:
    """A plain postgresql:// URL names SQLAlchemy's default driver, psycopg2; without it, use psycopg 3
    (korch's `postgres` extra) instead. URLs that name a driver, and other databases, are kept as given."""
    if url.startswith("postgresql://") and not have_psycopg2:
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def open_storage(url: str):
    """An RDB storage; a URL that can't be opened is the user's to fix (one line, exit 2)."""
    import importlib.util

    import optuna

    from korch.errors import UserError

    try:
        return optuna.storages.RDBStorage(sqlalchemy_url(url, importlib.util.find_spec("psycopg2") is not None),
                                          heartbeat_interval=None)
    except Exception as exc:  # sqlalchemy raises many kinds (bad driver, refused connection, bad password)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--storage {url}: cannot open the study storage ({first}); give sqlite:///PATH or "
                        "postgresql://USER@HOST:PORT/DB") from None


def close_running(study, reason: str) -> list[int]:
    """Close trials left RUNNING (a crash, Ctrl-C, the window's end): PRUNED with their last reported value
    (kept and ranked), else FAILED. Returns the trial numbers closed."""
    from optuna.trial import TrialState

    closed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "stopped", reason)
        state = TrialState.PRUNED if trial.intermediate_values else TrialState.FAIL
        study.tell(trial.number, state=state)
        closed.append(trial.number)
    return closed


def done_count(trials: list) -> int:
    return sum(1 for t in trials if t.state.name in DONE)


def durations(trials: list) -> list[float]:
    """Seconds each trial took that ran to its end (COMPLETE: finished or stopped by ASHA)."""
    return [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
            if t.state.name == "COMPLETE" and t.datetime_start and t.datetime_complete]


def trial_metric(trial) -> float | None:
    """A trial's result: its value, else its last reported epoch (a stopped trial keeps what it reported)."""
    if trial.value is not None:
        return float(trial.value)
    if trial.intermediate_values:
        return float(trial.intermediate_values[max(trial.intermediate_values)])
    return None


def trial_epochs(trial) -> int:
    """Epochs a trial reported (the searcher records it at the end: Tune's last report skips on_trial_result)."""
    return int(trial.user_attrs.get("epochs", len(trial.intermediate_values)))


def trial_status(trial, max_epochs: int) -> str:
    state = trial.state.name
    if state == "COMPLETE":
        return "complete" if trial_epochs(trial) >= max_epochs else "stopped_early"
    if state == "PRUNED":
        return f"stopped_{trial.user_attrs.get('stopped', 'pruned')}"
    return {"FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}.get(state, state.lower())


def _iso(moment: datetime | None) -> str:
    return moment.astimezone().isoformat(timespec="seconds") if moment else ""


def build_leaderboard(trials: list, mode: str, max_epochs: int) -> list[dict[str, Any]]:
    """Rows best first (trials without a metric last): trial_id, status, metric, epochs, params, times."""
    rows = []
    for t in trials:
        metric = trial_metric(t)
        rows.append({"trial_id": t.number, "status": trial_status(t, max_epochs), "metric": metric,
                     "epochs": trial_epochs(t), "params": json.dumps(t.params, sort_keys=True),
                     "started_at": _iso(t.datetime_start), "finished_at": _iso(t.datetime_complete),
                     "folder": t.user_attrs.get("folder", "")})
    sign = -1.0 if mode == "max" else 1.0

    def key(row):
        value = row["metric"]
        bad = value is None or (isinstance(value, float) and math.isnan(value))
        return (bad, 0.0 if bad else sign * value, row["trial_id"])

    return sorted(rows, key=key)


def ranked(rows: list[dict]) -> list[dict]:
    """Leaderboard rows with a result and a model folder, best first (what best.yaml and ensembles draw from)."""
    return [r for r in rows if r["metric"] is not None and not math.isnan(r["metric"]) and r["status"] != "failed"]


def write_leaderboard(rows: list[dict], path: Path) -> None:
    columns = ["trial_id", "status", "metric", "epochs", "params", "started_at", "finished_at", "folder"]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)  # a reader (or a crash) never sees half a file


def format_table(rows: list[dict], limit: int = 10) -> str:
    """The live progress table: best trials first."""
    lines = [f"{'trial':>5} {'status':<18} {'metric':>8} {'ep':>3}  params"]
    for row in rows[:limit]:
        metric = "-" if row["metric"] is None else f"{row['metric']:.4f}"
        params = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in json.loads(row["params"]).items())
        lines.append(f"{row['trial_id']:>5} {row['status']:<18} {metric:>8} {row['epochs']:>3}  {params}")
    if len(rows) > limit:
        lines.append(f"  ... {len(rows) - limit} more in leaderboard.csv")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
