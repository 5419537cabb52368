"""Provenance: what a stage's results were made from, and whether a re-run may reuse them.

Every stage folder gets `korch.json` with a hash of the stage's resolved spec (fields that cannot change results
left out), its parents' output hashes, fingerprints of its input files, and the korch version and commit. A
re-run compares the stage's current provenance with the recorded one: a finished stage is reused only when they
agree, and an unfinished one resumes only when nothing beyond the resume-safe fields changed.

Everything here except the file hashing is pure, so the decisions are tested as data.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

PROVENANCE = "korch.json"

# Fields that change how a run is logged, checkpointed or placed, never what it computes: the loop resumes
# exactly from any checkpoint, and the corpus pipeline's output does not depend on its actor count.
RESULT_NEUTRAL: tuple[str, ...] = (
    "train.log_every_steps", "train.checkpoint_every_steps", "train.keep_checkpoints",
    "data.preprocess_actors", "data.actor_cpus",
    "distributed.cpus_per_worker", "distributed.gpus_per_worker", "distributed.max_failures",
)
# Fields that change results for a fresh run but that an unfinished run may change and still resume: korch
# checkpoints are consolidated, so they restore on any worker count, device or backend.
RESUME_SAFE: tuple[str, ...] = RESULT_NEUTRAL + (
    "distributed.num_workers", "distributed.use_gpu", "distributed.backend",
)
# Outputs a later stage can read; their hash is what a child records for its parent.
OUTPUT_FOLDERS: tuple[str, ...] = ("final", "best", "swa", "data", "tokenizer", "ensemble")
_OUTPUT_SKIP = {"events.jsonl", "korch.json", "summary.json"}


def flatten(spec: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1e-3}}` -> `{"train.lr": 1e-3}`; lists stay values, so a changed list shows as one field."""
    flat: dict[str, Any] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _drop(flat: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    fields = tuple(fields)
    return {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in fields)}


def spec_hash(flat_spec: Mapping[str, Any], explicit: Iterable[str] | None = None) -> str:
    """Over the fields set away from their defaults (all when `explicit` is None), so a field a korch upgrade adds at
    its default keeps the hash."""
    kept = _drop(flat_spec if explicit is None else {k: flat_spec[k] for k in explicit if k in flat_spec}, RESULT_NEUTRAL)
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = RESULT_NEUTRAL,
                   old_explicit: Iterable[str] | None = None, new_explicit: Iterable[str] | None = None) -> list[str]:
    """`train.lr 0.002 → 0.001` for each field (outside `ignore`) that differs. A field on one side only (a korch
    upgrade added or removed it) counts only where that side set it away from its default (`*_explicit`)."""
    old, new = _drop(old, ignore), _drop(new, ignore)
    explicit = {"old": None if old_explicit is None else set(old_explicit),
                "new": None if new_explicit is None else set(new_explicit)}
    lines = []
    for key in sorted(set(old) | set(new)):
        if key in old and key in new:
            if old[key] != new[key]:
                lines.append(f"{key} {_short(old[key])} → {_short(new[key])}")
            continue
        side = "old" if key in old else "new"
        if explicit[side] is None or key in explicit[side]:
            lines.append(f"{key} {_short(old.get(key, 'unset'))} → {_short(new.get(key, 'unset'))}")
    return lines


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


# --- fingerprints (these touch files) -------------------------------------------------------------------

def file_stats(paths: Iterable[str]) -> list[list]:
    """[path, size, mtime_ns] of every file under the given files, folders and globs, sorted. Cheap: no content is
    read, as the data pipeline's own fingerprint does; a URI is recorded as itself."""
    stats: list[list] = []
    for item in paths:
        if not item:
            continue
        if "://" in item:
            stats.append([item, None, None])
            continue
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches or not any(os.path.exists(m) for m in matches):
            stats.append([item, "missing", None])
        for match in matches:
            if os.path.isdir(match):
                for root, dirs, files in os.walk(match):
                    dirs.sort()
                    for name in sorted(files):
                        stats.append(_stat(os.path.join(root, name)))
            elif os.path.exists(match):
                stats.append(_stat(match))
    return stats


def _stat(path: str) -> list:
    info = os.stat(path)
    return [os.path.abspath(path), info.st_size, info.st_mtime_ns]


def inputs_fingerprint(stats: list[list]) -> str:
    return hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()[:16]


def output_hash(stage_dir: Path) -> str | None:
    """sha256 over the contents of the stage's output folders (final/, data/, tokenizer/, ...); None if it has none."""
    digest = hashlib.sha256()
    found = False
    for folder in OUTPUT_FOLDERS:
        root = stage_dir / folder
        if not root.is_dir():
            continue
        # Prepared data lists every shard's sha256 in its manifest: hashing that is hashing the shards.
        files = [root / "manifest.json"] if (root / "manifest.json").is_file() else \
            sorted(p for p in root.rglob("*") if p.is_file() and p.name not in _OUTPUT_SKIP)
        for path in files:
            found = True
            digest.update(str(path.relative_to(stage_dir)).encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16] if found else None


def korch_commit() -> str | None:
    """The git commit korch runs from, when it runs from a checkout (an install from a wheel has none)."""
    source = Path(__file__).resolve().parents[3]
    if not (source / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# --- the record and the decision --------------------------------------------------------------------------

@dataclass
class Provenance:
    spec: dict[str, Any]
    """The resolved stage spec, flattened (`train.lr` -> value)."""
    parents: dict[str, str | None]
    """Each needed stage's output hash."""
    inputs: str
    """Fingerprint of the stage's input files (data, validation data, pretrained model, tokenizer)."""
    explicit: list[str] | None = None
    """The spec's fields that differ from their defaults (None: treat all as set)."""
    finished: bool = False
    output: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        from korch import __version__

        return {"spec_hash": spec_hash(self.spec, self.explicit), "parents": self.parents, "inputs": self.inputs,
                "finished": self.finished, "output": self.output, "korch_version": __version__,
                "git_commit": korch_commit(), "spec": self.spec, "explicit": self.explicit, **self.extra}


def read_provenance(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / PROVENANCE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_provenance(stage_dir: Path, record: Mapping[str, Any]) -> None:
    tmp = stage_dir / (PROVENANCE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False, default=str))
    tmp.replace(stage_dir / PROVENANCE)


@dataclass(frozen=True)
class Decision:
    action: str
    """`skip` (reuse the finished stage), `resume`, `run` (nothing to reuse), `rerun` (a finished stage runs
    again) or `restart` (an unfinished one starts over instead of resuming)."""
    reasons: tuple[str, ...] = ()


def decide(recorded: Mapping[str, Any] | None, current: Provenance, finished: bool, started: bool,
           forced: str | None = None) -> Decision:
    """What to do with a stage folder, given what it was made from (`recorded`) and what it would be made from now.

    `forced` (a parent re-runs in this invocation, or `--from-stage`) always re-runs. A finished stage from before
    provenance existed (no korch.json) is reused, as korch always did.
    """
    if forced:
        return Decision("rerun" if finished else "restart" if started else "run", (forced,))
    if not finished and not started:
        return Decision("run")
    if recorded is None:
        return Decision("skip" if finished else "resume")
    explicit = dict(old_explicit=recorded.get("explicit"), new_explicit=current.explicit)
    reasons = changed_fields(recorded.get("spec", {}), current.spec, **explicit)
    for name, digest in current.parents.items():
        if recorded.get("parents", {}).get(name, digest) != digest:
            reasons.append(f"{name}'s output changed")
    if recorded.get("inputs") != current.inputs:
        reasons.append("input files changed")
    if finished:
        return Decision("rerun", tuple(reasons)) if reasons else Decision("skip")
    unsafe = changed_fields(recorded.get("spec", {}), current.spec, ignore=RESUME_SAFE, **explicit)
    if unsafe or len(reasons) > len(changed_fields(recorded.get("spec", {}), current.spec, **explicit)):
        return Decision("restart", tuple(reasons))
    return Decision("resume", tuple(reasons))
