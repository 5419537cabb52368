"""What a failed Ray Train run tells the user: which rank went wrong first, in one line, and every rank's error
in a file beside the checkpoints.

When one rank's process dies, the others fail a moment later in their next collective ("Connection closed by
peer", "Broken pipe"). Ray lists them all, rank 0 first, so the last error line of its message is usually such
a collateral error. The line names the dead rank first and the others' errors after it.
"""

from __future__ import annotations

import re
from pathlib import Path

FAILURE_FILE = "failure.txt"
MAX_CAUSE_CHARS = 200


def describe_failure(error: BaseException) -> str:
    """One line: the ranks whose process died (with Ray's exit type and detail), then the errors the other ranks
    raised, each distinct error once with the ranks that raised it."""
    failures = getattr(error, "worker_failures", None)
    if not failures:
        cause = getattr(error, "controller_failure", None)  # e.g. the worker group did not start in time
        return _exception_line(cause) if cause is not None else _last_error_line(str(error)) or type(error).__name__
    died = {rank: why for rank, exc in failures.items() if (why := _died_process(exc)) is not None}
    # Beside a dead rank, the others' errors are its echo: their first sentence is enough.
    raised = {rank: _exception_line(exc, first_sentence=bool(died)) for rank, exc in failures.items()
              if rank not in died}
    parts = [f"{_ranks(ranks)}'s process died" + (f" ({why})" if why else "") for why, ranks in _group(died).items()]
    then = " then" if parts else ""
    parts += [f"{_ranks(ranks)}{then} raised {line}" for line, ranks in _group(raised).items()]
    return "; ".join(parts)


def write_failure(stage_dir: Path, error: BaseException, line: str) -> Path:
    """`line` (describe_failure's), then every rank's error as Ray reported it, tracebacks included."""
    path = stage_dir / FAILURE_FILE
    path.write_text(f"{line}\n\n{error}\n", encoding="utf-8")
    return path


def _died_process(exc: BaseException) -> str | None:
    """None when the rank raised an error itself; otherwise why its process died ('' when Ray did not say)."""
    from ray.exceptions import RayActorError

    cause = getattr(exc, "health_check_failure", exc)  # Train wraps a dead actor in a failed health check
    if not isinstance(cause, RayActorError):
        return None
    text = " ".join(str(cause).split())
    exit_type = re.search(r"Worker exit type: (\w+)", text)
    detail = re.search(r"Worker exit detail: (.+?\.)(?: |$)", text)
    return ": ".join(m.group(1) for m in (exit_type, detail) if m)


def _exception_line(exc: BaseException, first_sentence: bool = False) -> str:
    message = _last_error_line(str(exc)) if "\n" in str(exc) else str(exc).strip()
    # gloo prefixes its messages with the C++ source position: "[/__w/pytorch/.../pair.cc:553] Connection closed"
    message = re.sub(r"^\[[^\]]*\.\w+:\d+\]\s*", "", message)
    if first_sentence:
        message = re.split(r"(?<=\.) ", message, maxsplit=1)[0].rstrip(".")
    # A line taken from a traceback already starts with its exception's name.
    line = message if re.match(r"^[\w.]+(Error|Exception):", message) else f"{_qualified(exc)}: {message}"
    return line if len(line) <= MAX_CAUSE_CHARS else line[:MAX_CAUSE_CHARS - 1] + "…"


def _qualified(exc: BaseException) -> str:
    module = type(exc).__module__
    return type(exc).__name__ if module == "builtins" else f"{module}.{type(exc).__name__}"


def _last_error_line(text: str) -> str:
    """The line of a traceback-laden message that names the exception, not Ray's headers or the frames."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    causes = [line for line in lines if not line.startswith(("Traceback", "File ", "[Rank", "Training failed"))
              and ("Error" in line.split(":")[0] or "Exception" in line.split(":")[0])]
    return (causes or lines or [""])[-1]


def _group(by_rank: dict[int, str]) -> dict[str, list[int]]:
    grouped: dict[str, list[int]] = {}
    for rank, value in sorted(by_rank.items()):
        grouped.setdefault(value, []).append(rank)
    return grouped


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
