"""The driver's view of a running stage: one live line on a terminal, steady plain lines elsewhere.

The stage's RunLog actor writes metrics.jsonl and events.jsonl on the driver's node; this thread tails them, so
the terminal shows korch's progress without the workers' own output (which goes to RUNS/<job>/logs/ unless
`--verbose`). On a TTY the line is redrawn in place: stage, step/total, loss, samples/s, ETA, attempt. Under
`ray job submit`, a pipe or a file, a plain line is printed every `KORCH_PROGRESS_SECONDS` (default 30). Failures,
resumes and the other events print as single lines either way.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO

SHOWN_EVENTS = ("failure", "resume", "best", "early_stop", "swa")


def format_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_line(stage: str, step: int, total: int, loss: float | None, samples_per_s: float | None,
                  eta_s: float | None, attempt: int) -> str:
    parts = [f"[korch] {stage}", f"step {step}/{total}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if samples_per_s is not None:
        parts.append(f"{samples_per_s:.1f} samples/s")
    parts.append(f"ETA {format_eta(eta_s)}")
    if attempt > 1:
        parts.append(f"attempt {attempt}")
    return "  ".join(parts)


def event_line(stage: str, event: dict) -> str:
    fields = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "step", "attempt", "time") and v is not None)
    where = f" at step {event['step']}" if event.get("step") is not None else ""
    return f"[korch] {stage}: {event['event']}{where} {fields}".rstrip()


class _Tail:
    """New complete lines of a JSON-lines file since the last read (a torn last line waits for its end)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0  # what earlier attempts wrote is history

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        rows = []
        for line in data[:end].splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows


class ProgressView(threading.Thread):
    def __init__(self, stage_dir: Path, stage: str, total_steps: int, out: IO[str] | None = None,
                 tty: bool | None = None, interval_s: float | None = None, poll_s: float = 0.5):
        super().__init__(daemon=True, name=f"korch-progress-{stage}")
        self.stage, self.total = stage, total_steps
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.interval = interval_s if interval_s is not None else float(os.environ.get("KORCH_PROGRESS_SECONDS", "30"))
        self.poll = poll_s
        self.metrics, self.events = _Tail(stage_dir / "metrics.jsonl"), _Tail(stage_dir / "events.jsonl")
        self.attempt = 1
        self.last: dict | None = None
        self.rate: tuple[float, int] | None = None  # (time, step) of the first row this attempt: ETA from the pace since
        self.printed_at: float | None = None
        self.shown_step = -1
        self.live = False
        self._finished = threading.Event()

    def run(self) -> None:
        while not self._finished.wait(self.poll):
            self.update()
        self.update(final=True)

    def stop(self) -> None:
        self._finished.set()
        self.join(timeout=10)

    def update(self, final: bool = False) -> None:
        for event in self.events.rows():
            if event.get("attempt"):
                self.attempt = max(self.attempt, int(event["attempt"]))
            if event.get("event") in SHOWN_EVENTS:
                if event.get("event") == "resume":
                    self.rate = None
                self._print_line(event_line(self.stage, event))
        for row in self.metrics.rows():
            if "loss" in row and "step" in row:
                self.last = row
                if self.rate is None:
                    self.rate = (float(row.get("time", time.time())), int(row["step"]))
        if self.last is None or self.last["step"] == self.shown_step and not self.tty:
            return
        line = self.line()
        now = time.monotonic()
        if self.tty:
            self.out.write("\r\x1b[2K" + line)
            self.out.flush()
            self.live = True
            if final:
                self.out.write("\n")
                self.live = False
        due = self.printed_at is None or now - self.printed_at >= self.interval
        if not self.tty and (final or due or self.last["step"] >= self.total):
            self.out.write(line + "\n")
            self.out.flush()
            self.printed_at = now
            self.shown_step = self.last["step"]

    def line(self) -> str:
        row = self.last or {}
        step = int(row.get("step", 0))
        eta = None
        if self.rate is not None and step > self.rate[1]:
            pace = (float(row.get("time", time.time())) - self.rate[0]) / (step - self.rate[1])
            eta = pace * max(self.total - step, 0)
        return progress_line(self.stage, step, self.total, row.get("loss"), row.get("samples_per_s"), eta, self.attempt)

    def _print_line(self, text: str) -> None:
        if self.live:
            self.out.write("\r\x1b[2K")
            self.live = False
        self.out.write(text + "\n")
        self.out.flush()
