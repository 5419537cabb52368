"""The driver's progress view, in-process: the live line on a terminal, steady lines elsewhere, events once."""

from __future__ import annotations

import io
import json
import logging
import sys

from korch.train.console import _Once
from korch.train.progress import ProgressView, format_eta, progress_line


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _append(path, *rows):
    with open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def test_progress_line_names_everything_a_user_watches():
    assert progress_line("mlm", 120, 200, 7.91234, 12.34, 45, 1) == \
        "[korch] mlm  step 120/200  loss 7.9123  12.3 samples/s  ETA 0:45"
    assert progress_line("mlm", 1, 200, None, None, None, 2).endswith("ETA --:--  attempt 2")
    assert format_eta(3725) == "1:02:05" and format_eta(-1) == "--:--"


def test_a_terminal_gets_one_redrawn_line_and_events_on_their_own(tmp_path):
    _append(tmp_path / "events.jsonl", {"event": "start", "step": 0, "attempt": None, "time": 0})  # history: not shown
    out = _Terminal()
    view = ProgressView(tmp_path, "mlm", 100, out=out)
    _append(tmp_path / "metrics.jsonl", {"step": 10, "loss": 9.0, "samples_per_s": 4.0, "time": 100.0},
            {"step": 20, "loss": 8.0, "samples_per_s": 4.0, "time": 110.0})
    view.update()
    _append(tmp_path / "events.jsonl", {"event": "failure", "step": 25, "attempt": 1, "time": 0, "rank": 1})
    _append(tmp_path / "events.jsonl", {"event": "resume", "step": 20, "attempt": 2, "time": 0, "from_step": 20})
    view.update(final=True)
    text = out.getvalue()
    assert text.count("\n") == 3  # failure, resume, and the last live line ended
    assert "\r\x1b[2K[korch] mlm  step 20/100  loss 8.0000  4.0 samples/s  ETA 1:20" in text
    assert "[korch] mlm: failure at step 25 rank=1\n" in text and "[korch] mlm: resume at step 20 from_step=20\n" in text
    assert text.rstrip("\n").endswith("attempt 2")


def test_a_pipe_gets_plain_lines_at_a_steady_interval(tmp_path):
    out = io.StringIO()
    view = ProgressView(tmp_path, "mlm", 30, out=out, interval_s=3600)
    for step in (10, 20, 30):
        _append(tmp_path / "metrics.jsonl", {"step": step, "loss": 1.0, "samples_per_s": 2.0, "time": float(step)})
        view.update()
    view.update(final=True)
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[1] for line in lines] == ["step 10/30", "step 30/30"]  # first, then the end; no repeats
    assert "\r" not in out.getvalue()


def test_a_repeated_warning_reaches_the_console_once():
    once = _Once()
    record = logging.LogRecord("ray.train", logging.WARNING, __file__, 1, "Failed to query controller", None, None)
    assert [once.filter(record) for _ in range(3)] == [True, False, False]
    assert sys.stdout  # the filter is attached to console handlers only (korch.train.console.quiet_driver_console)


def test_the_thread_starts_and_stops_with_the_stage(tmp_path):
    out = io.StringIO()
    view = ProgressView(tmp_path, "mlm", 10, out=out, poll_s=0.01)
    view.start()
    _append(tmp_path / "metrics.jsonl", {"step": 10, "loss": 1.0, "samples_per_s": 2.0, "time": 1.0})
    view.stop()
    assert not view.is_alive() and "step 10/10" in out.getvalue()
