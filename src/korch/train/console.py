"""What `korch run` prints, and where everything else goes.

By default the terminal shows korch's own lines only: the plan, each stage's start and finish, a live progress
line (`korch.train.progress`), failures and resumes. Ray's and the workers' own output (DeepSpeed notices, Ray
Data progress bars, Ray Train's controller warnings) stays out of the driver and is copied to `RUNS/<job>/logs/`
when korch started Ray itself. `korch run --verbose` (or `KORCH_VERBOSE=1`) shows all of it, as plain Ray would.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

VERBOSE_ENV = "KORCH_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


class _Once(logging.Filter):
    """Each distinct message reaches the terminal once (Ray repeats some warnings every poll)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.getMessage()}"
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def quiet_before_local_init() -> None:
    """An embedded Ray's own notices (token auth on by default) say nothing to a laptop user; a cluster's do."""
    if not verbose():
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)


def quiet_driver_console() -> None:
    """Ray's driver-side console handlers show warnings and errors only (Ray Data's: errors), each once; Ray Data
    draws no bars."""
    if verbose():
        return
    once = _Once()
    logging.lastResort.addFilter(once)  # Ray loggers without handlers print through it
    try:
        from ray.data import DataContext

        context = DataContext.get_current()
        logging.getLogger("ray.data").addFilter(lambda record: "Progress bars disabled" not in record.getMessage())
        context.enable_progress_bars = False
        context.enable_operator_progress_bars = False
    except Exception:  # noqa: BLE001 (a Ray Data without these knobs: bars are cosmetic)
        pass
    for name in ["ray", *[n for n in logging.root.manager.loggerDict if n.startswith("ray.")]]:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(max(handler.level, logging.ERROR if name.startswith("ray.data") else logging.WARNING))
                handler.addFilter(once)


def collect_ray_logs(job_dir: Path) -> Path | None:
    """Copy the local Ray session's logs (workers' stdout/stderr, raylet, Ray Data, Train controller) to
    `RUNS/<job>/logs/`, where they outlive the session's temp folder. Only for a Ray korch started itself: a
    cluster's logs stay on its nodes (`ray logs`, the dashboard)."""
    try:
        import ray

        session = Path(ray._private.worker._global_node.get_session_dir_path())  # noqa: SLF001 (no public API)
    except Exception:  # noqa: BLE001
        return None
    source, target = session / "logs", job_dir / "logs"
    if not source.is_dir():
        return None
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock", "events", "old"),
                    ignore_dangling_symlinks=True)
    return target
