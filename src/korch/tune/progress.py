"""The live side of a campaign: a Tune callback that keeps `progress.txt` and `leaderboard.csv` current, and
the stopper that closes the search window.

Rewriting the leaderboard after every trial means a campaign that dies anyhow (SIGKILL, a power cut) still
leaves a correct one behind; `korch tune --resume` rewrites it from the study in any case.
"""

from __future__ import annotations

import time
from pathlib import Path

from ray.tune import Callback
from ray.tune.stopper import Stopper


class WindowStopper(Stopper):
    """Ends the experiment at the search window's end. Unlike `time_budget_s` nothing is lost: every epoch a
    trial reported is already in the study, and korch closes the stopped trials with their last value."""

    def __init__(self, search_end: float):
        self.search_end = search_end

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return time.time() >= self.search_end


class Progress(Callback):
    def __init__(self, campaign_dir: Path, study, mode: str, max_epochs: int, search_end: float):
        self.campaign_dir, self.study, self.mode = Path(campaign_dir), study, mode
        self.max_epochs, self.search_end = max_epochs, search_end
        self.last_print = 0.0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.refresh()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.refresh(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.refresh(force=True)

    def refresh(self, force: bool = False, final: bool = False) -> None:
        from korch.tune.study import build_leaderboard, format_table, write_leaderboard

        rows = build_leaderboard(self.study.get_trials(deepcopy=False), self.mode, self.max_epochs)
        write_leaderboard(rows, self.campaign_dir / "leaderboard.csv")
        left = max(0.0, self.search_end - time.time())
        table = f"[korch] tune: {len(rows)} trial(s), search window {'closed' if final else f'{left:.0f} s left'}\n" \
                + format_table(rows)
        (self.campaign_dir / "progress.txt").write_text(table + "\n")
        if force or final or time.time() - self.last_print > 10:
            print(table, flush=True)
            self.last_print = time.time()
