"""Helpers for tests that run `korch` as a user does (a subprocess from the repo root)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
GUARD = REPO / "tests" / "unpickle_guard"
PAYLOAD_MARKER = "KORCH-PLANTED-PAYLOAD"


def korch(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "korch.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def small(stage_dir: Path, steps: int, *extra: str) -> list[str]:
    """Overrides that reuse the quickstart's prepared data and tokenizer for a short run."""
    return ["--set", f"stages.mlm.train.max_steps={steps}", "--set", f"stages.mlm.data.inputs=[{stage_dir / 'data'}]",
            "--set", f"stages.mlm.tokenizer.path={stage_dir / 'tokenizer'}", *extra]


def write_job(path: Path, quickstart_stage: Path, stages: list[dict], name: str = "quickstart") -> Path:
    """A job whose stages are the quickstart's mlm stage with the given changes (deep-merged), all reading the
    quickstart's prepared data and tokenizer unless a change says otherwise."""
    base = yaml.safe_load((REPO / "jobs" / "quickstart.yaml").read_text())["stages"][0]
    base["data"]["inputs"] = [str(quickstart_stage / "data")]
    base["tokenizer"]["path"] = str(quickstart_stage / "tokenizer")

    def merge(into: dict, change: dict) -> dict:
        for key, value in change.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value
        return into

    job = {"name": name, "stages": [merge(copy.deepcopy(base), change) for change in stages]}
    path.write_text(yaml.safe_dump(job, allow_unicode=True, sort_keys=False))
    return path


# --- the unpickling guard (tests/unpickle_guard/sitecustomize.py) ------------------------------------------

def guard_env(root: Path, log: Path) -> dict:
    """Environment that loads the guard into the korch process and every Ray worker it starts."""
    return {"PYTHONPATH": os.pathsep.join([str(GUARD), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "KORCH_UNPICKLE_GUARD_ROOT": str(root), "KORCH_UNPICKLE_GUARD_LOG": str(log),
            "KORCH_UNPICKLE_GUARD_MARKER": PAYLOAD_MARKER}


def guard_report(log: Path) -> tuple[list[dict], int]:
    """(refused unpickling attempts, processes in which the guard had patched torch)."""
    rows = read_jsonl(log) if log.exists() else []
    return [r for r in rows if r["event"] == "refused"], len({r["pid"] for r in rows if r["event"] == "torch"})


class Boom:
    """Unpickling this creates the marker file: proof that someone ran code from the run folder."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        # The payload names the marker file; its bytes carry PAYLOAD_MARKER, which the guard recognises.
        return (open, (self.marker, "w"))


PICKLE_NAMES = ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "optimizer.bin", "model.pt",
                "rng_state.pth", "scheduler.pt", "mp_rank_00_model_states.pt",
                "zero_pp_rank_0_mp_rank_00_optim_states.pt", "state.pkl")


def plant_pickles(folder: Path, marker: Path) -> None:
    """Malicious pickles under the names HF Trainer, DeepSpeed and torch resumes read, beside korch's files."""
    import pickle

    assert PAYLOAD_MARKER in marker.name
    payload = pickle.dumps(Boom(str(marker)))
    for name in PICKLE_NAMES:
        (folder / name).write_bytes(payload)
