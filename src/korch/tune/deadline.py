"""Deadline arithmetic for tuning campaigns, as pure functions of clock readings (seconds since the epoch).

The campaign's end (`--deadline` or start + `--time-budget`) is split into the search window and what comes
after it: the `--reserve` for the hand-off (full-data retrain, ensemble) and a fixed margin for korch's own
outputs (leaderboard, plots, best.yaml) and Ray's shutdown. Ray's `time_budget_s` instead ends everything at
once and reserves nothing.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import datetime

from korch.errors import UserError

OUTPUT_MARGIN_S = 15.0
"""Seconds kept after the search for the leaderboard, plots, best.yaml and Ray's shutdown (measured ~5-10 s on 2 cores)."""


@dataclass(frozen=True)
class Window:
    search_end: float
    """No trial runs past this; trials still running are stopped here, keeping their last result."""
    deadline: float
    """Everything, hand-off included, is done by here."""


def parse_deadline(text: str) -> float:
    """ISO 8601 (`2026-03-01T18:00`, `...+09:00`; no zone means local time) to epoch seconds."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UserError(f"--deadline {text!r} is not an ISO 8601 time; write e.g. 2026-03-01T18:00:00+09:00") from None


def build_window(now: float, deadline: float | None, time_budget_s: float | None, reserve_s: float,
                 margin_s: float = OUTPUT_MARGIN_S) -> Window:
    """The search window from exactly one of `deadline` / `time_budget_s`, less the reserve and the output margin."""
    if (deadline is None) == (time_budget_s is None):
        raise UserError("give exactly one of --deadline ISO8601 or --time-budget SECONDS")
    if reserve_s < 0:
        raise UserError(f"--reserve {reserve_s} is negative; give the seconds the hand-off needs (0 for none)")
    end = deadline if deadline is not None else now + float(time_budget_s)
    search_end = end - reserve_s - margin_s
    if search_end <= now:
        what = "--deadline" if deadline is not None else "--time-budget"
        raise UserError(f"{what} leaves no time to search: {end - now:.0f} s remain, and --reserve {reserve_s:.0f} s "
                        f"plus {margin_s:.0f} s for outputs come off it; move the deadline or lower --reserve")
    return Window(search_end=search_end, deadline=end)


def estimate_trial_s(durations: list[float]) -> float | None:
    """What the next trial will take: the median of the finished ones (robust to one slow straggler or an
    ASHA-stopped short one). None when none has finished yet."""
    return statistics.median(durations) if durations else None


def can_start_trial(now: float, search_end: float, durations: list[float]) -> bool:
    """Whether a new trial may start: the window is open and, once trials have finished, the typical trial
    fits in what is left of it. Before any trial finishes nothing is known, so the first ones may start."""
    if now >= search_end:
        return False
    estimate = estimate_trial_s(durations)
    return estimate is None or now + estimate <= search_end


def seconds_left(now: float, search_end: float) -> float:
    return max(0.0, search_end - now)
