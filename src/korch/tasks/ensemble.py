"""The `ensemble` task: soft voting over the class probabilities of several trained classifiers.

    - name: ens
      task: ensemble
      needs: [cls_bert, cls_deberta]
      data: *labelled            # the members' data section (YAML anchor): the same seeded validation split
      ensemble: {weights: optimize, metric: macro_f1}

Flow (all on the driver, in-process; validation sets are small): resolve each member to model folders (a stage
name gives its `swa/`, `best/`, `final/`, whichever exist; a path is used as is) -> rebuild the validation split
the members were scored on (`build_splits(stage.data, train.seed)`) -> run every candidate folder over it with
its own tokenizer and truncation -> each member keeps its best-scoring candidate -> weights (`score`, `uniform`
or `optimize`) -> the mixed probabilities are evaluated and written, with an `ensemble/` folder that
`korch predict --model .../ensemble` runs.

A member that cannot be used (missing folder, unreadable weights, other label names) is skipped with a warning
and the others are reweighted; with none left the stage fails with a `UserError`. Members are matched to the
data's labels by name, so their id orders may differ.

Torch, numpy and transformers are imported inside functions: the registry imports this module for its options.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import Field, field_validator

from korch.errors import UserError
from korch.spec import Section

FORMAT = "korch-ensemble"
VERSION = 1
ENSEMBLE_FILE = "ensemble.json"
CANDIDATES = ("swa", "best", "final")


class EnsembleOptions(Section):
    members: list[str] = []
    """Stage names or model folders to combine. Unset: the stages in `needs`. A stage name uses the best of its `candidates` folders; a path is a model folder used as is."""
    candidates: list[Literal["swa", "best", "final"]] = ["swa", "best", "final"]
    """Which folders of a member stage to consider: each one present is scored on the validation split and the member uses the highest-scoring one."""
    weights: Literal["score", "uniform", "optimize"] = "score"
    """`score`: each member's validation `metric`, normalised to sum 1; `uniform`; `optimize`: non-negative weights summing to 1 that minimise the validation log-loss of the mix (fitted on the rows it reports, so its validation score is optimistic)."""
    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    """Validation metric that picks each member's candidate folder and sets the `score` weights."""
    batch_size: int = Field(default=64, ge=1)
    """Rows per forward pass when scoring members."""

    @field_validator("candidates")
    @classmethod
    def _some_candidates(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("candidates must name at least one of swa, best, final, each once")
        return value


# --- pure parts: weights, mixing, metrics ----------------------------------------------------------------------

def normalise_weights(scores: Sequence[float]) -> list[float]:
    """Scores -> weights summing to 1 (negative scores count as 0; all zero gives uniform weights)."""
    clipped = [max(0.0, float(s)) for s in scores]
    total = sum(clipped)
    if not clipped:
        return []
    if total <= 0:
        return [1.0 / len(clipped)] * len(clipped)
    return [s / total for s in clipped]


def combine(prob_list: Sequence[Any], weights: Sequence[float]):
    """The weighted mean of per-member probability arrays (rows x classes); weights need not sum to 1."""
    import numpy as np

    if not prob_list or len(prob_list) != len(weights):
        raise ValueError(f"combine needs one weight per member, got {len(prob_list)} arrays and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("combine needs weights with a positive sum")
    mix = np.zeros_like(np.asarray(prob_list[0], dtype=np.float64))
    for probs, weight in zip(prob_list, weights):
        mix += float(weight) * np.asarray(probs, dtype=np.float64)
    return mix / total


def log_loss(probs, labels: Sequence[int]) -> float:
    import numpy as np

    probs = np.asarray(probs, dtype=np.float64)
    picked = probs[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean()) if len(labels) else 0.0


def optimise_weights(prob_list: Sequence[Any], labels: Sequence[int], max_iter: int = 5000,
                     tol: float = 1e-12) -> list[float]:
    """Non-negative weights summing to 1 that minimise the log-loss of the mixed probabilities on `labels`.

    The log-loss of a mixture is convex in its weights; this runs the mixture-weight EM update
    `w_k <- mean_i(w_k p_ik / sum_j w_j p_ij)` (p_ik: member k's probability of row i's true label) from uniform
    weights. Every step stays on the simplex and never raises the loss, so it converges to the optimum;
    it stops when the loss moves less than `tol`. Deterministic, numpy only, milliseconds for a validation set.
    """
    import numpy as np

    if len(prob_list) == 1:
        return [1.0]
    index = np.asarray(list(labels), dtype=np.int64)
    rows = np.arange(len(index))
    picked = np.clip(np.stack([np.asarray(p, dtype=np.float64)[rows, index] for p in prob_list], axis=1), 1e-12, None)
    weights = np.full(len(prob_list), 1.0 / len(prob_list))
    loss = float("inf")
    for _ in range(max_iter):
        mix = picked @ weights
        new_loss = float(-np.log(mix).mean())
        if loss - new_loss < tol:
            break
        loss = new_loss
        weights = weights * (picked / mix[:, None]).mean(0)
        weights /= weights.sum()
    return [float(w) for w in weights]


def classification_metrics(probs, labels: Sequence[int], names: Sequence[str]) -> dict:
    """loss, accuracy, macro_f1 and per_class_f1, with the classify task's arithmetic (from a confusion matrix)."""
    import numpy as np
    import torch

    from korch.tasks.classify import confusion_metrics

    probs = np.asarray(probs, dtype=np.float64)
    truth = np.asarray(labels, dtype=np.int64)
    predicted = probs.argmax(1) if len(truth) else truth
    confusion = np.zeros((len(names), len(names)), dtype=np.float64)
    np.add.at(confusion, (truth, predicted), 1.0)
    return {"loss": log_loss(probs, truth), **confusion_metrics(torch.from_numpy(confusion), names, max(len(truth), 1)),
            "rows": int(len(truth))}


def label_order(member_names: Sequence[str], names: Sequence[str], whose: str = "the data's") -> list[int]:
    """For each of `names`, the member's column holding it; ValueError when the label sets differ."""
    if sorted(member_names) != sorted(names) or len(set(member_names)) != len(member_names):
        raise ValueError(f"its labels [{', '.join(member_names)}] differ from {whose} [{', '.join(names)}]")
    return [list(member_names).index(name) for name in names]


# --- models ------------------------------------------------------------------------------------------------------

def model_file(folder: str | os.PathLike) -> Path:
    """The weights file whose hash identifies a member: model.safetensors (or a sharded model's index)."""
    folder = Path(folder)
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has no model.safetensors")


def sha256_of(path: str | os.PathLike) -> str:
    from korch.data.shards import sha256_file  # pyarrow: imported only when a hash is needed

    return sha256_file(str(path))


def member_probs(model_dir: str | os.PathLike, texts: Sequence[str], pairs: Sequence[str] | None = None,
                 batch_size: int = 64) -> tuple[list[str], Any]:
    """(label names in id order, rows x labels softmax probabilities) of one classifier folder, in-process.

    Truncates as `korch predict` does: at the tokenizer's model_max_length, capped by the position table.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import korch  # noqa: F401 - registers korch's pooled classifier with the Auto classes
    from korch.models import load_pretrained
    from korch.predict import _max_length

    model_dir = str(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir} has no config.json" if os.path.isdir(model_dir) else f"no folder {model_dir}")
    model_file(model_dir)
    model = load_pretrained(model_dir, AutoModelForSequenceClassification).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    names = [str(config.id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels)]
    max_length = _max_length(model_dir, config)
    out = np.zeros((len(texts), len(names)), dtype=np.float64)
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = [str(t) for t in texts[start:start + batch_size]]
            pair = [str(p) for p in pairs[start:start + batch_size]] if pairs is not None else None
            enc = tokenizer(chunk, pair, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            logits = model(**enc).logits
            out[start:start + len(chunk)] = torch.softmax(logits.float(), dim=-1).numpy()
    return names, out


def _log(message: str) -> None:
    print(f"[korch] ensemble: {message}", file=sys.stderr, flush=True)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


# --- the stage -----------------------------------------------------------------------------------------------------

@dataclass
class _Member:
    name: str
    folders: list[tuple[str, Path]]
    """(candidate name, folder) to score; a path member has one, named "path"."""
    missing: str | None = None
    scores: dict[str, dict] = field(default_factory=dict)
    chosen: str | None = None
    path: Path | None = None
    probs: Any = None


def resolve_members(options: EnsembleOptions, stage, ctx) -> list[_Member]:
    """Each member's candidate folders: a stage name (in `needs`, else a folder beside this stage) gives its
    `candidates` that exist; anything else is a model folder path (absolute, or relative to the current directory)."""
    entries = list(options.members) or list(stage.needed)
    if not entries:
        raise UserError(f"stage {stage.name}: ensemble has no members; set needs: [stage, ...] or ensemble.members")
    if len(set(entries)) != len(entries):
        raise UserError(f"stage {stage.name}: ensemble.members names a member twice: {', '.join(entries)}")
    members = []
    for entry in entries:
        stage_dir = ctx.needs.get(entry)
        if stage_dir is None and "/" not in entry and os.sep not in entry:
            stage_dir = Path(ctx.stage_dir).parent / entry
        if stage_dir is not None and (Path(stage_dir).is_dir() or entry in ctx.needs):
            folders = [(c, Path(stage_dir) / c) for c in options.candidates if (Path(stage_dir) / c).is_dir()]
            missing = None if folders else f"no {', '.join(c + '/' for c in options.candidates)} in {stage_dir}"
            members.append(_Member(entry, folders, missing))
        else:
            path = Path(entry).expanduser().resolve()
            members.append(_Member(entry, [("path", path)], None if path.is_dir() else f"no folder {path}"))
    return members


def score_members(members: list[_Member], texts, pairs, labels: list[int], names: list[str], metric: str,
                  batch_size: int) -> list[dict]:
    """Run every candidate folder over the validation rows; each member keeps its best. Returns the skipped."""
    skipped = []
    for member in members:
        errors = {}
        if member.missing is None:
            for candidate, folder in member.folders:
                _log(f"scoring {member.name} {candidate} ({folder}) on {len(texts)} validation rows")
                try:
                    member_names, probs = member_probs(folder, texts, pairs, batch_size)
                    probs = probs[:, label_order(member_names, names)]
                except Exception as exc:  # a broken member is skipped, not fatal: the others still combine
                    errors[candidate] = _reason(exc)
                    continue
                member.scores[candidate] = classification_metrics(probs, labels, names)
                if member.chosen is None or member.scores[candidate][metric] > member.scores[member.chosen][metric]:
                    member.chosen, member.path, member.probs = candidate, folder, probs
        if member.chosen is None:
            reason = member.missing or "; ".join(f"{c}: {e}" for c, e in errors.items())
            _log(f"skipping member {member.name}: {reason}")
            skipped.append({"name": member.name, "reason": reason})
        elif errors:
            for candidate, error in errors.items():
                _log(f"member {member.name}: ignoring {candidate} ({error})")
            member.scores.update({c: {"error": e} for c, e in errors.items()})
    return skipped


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _relative(target: Path, start: Path) -> str:
    try:
        return os.path.relpath(target, start)
    except ValueError:  # another drive (Windows): keep it absolute
        return str(target)


def write_ensemble_folder(folder: Path, names: list[str], members: list[dict]) -> None:
    """`folder/ensemble.json` for `korch predict`, written to a temporary folder and renamed into place.

    `members`: dicts with name, path (absolute) and weight; paths are stored relative to `folder` when possible.
    """
    folder = Path(folder)
    entries = [{"name": m["name"], "path": _relative(Path(m["path"]).resolve(), folder.resolve()),
                "sha256": sha256_of(model_file(m["path"])), "weight": float(m["weight"])} for m in members]
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / ENSEMBLE_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, "labels": list(names),
                                                 "members": entries}, indent=1, ensure_ascii=False), encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _weights_for(scheme: str, used: list, labels: list[int], metric: str) -> list[float]:
    if scheme == "uniform":
        return normalise_weights([1.0] * len(used))
    if scheme == "score":
        return normalise_weights([m.scores[m.chosen][metric] for m in used])
    return optimise_weights([m.probs for m in used], labels)


def run_ensemble_stage(stage, ctx) -> dict:
    """Score the members on the stage's validation split, weight them, and write weights.json, eval.json,
    predictions.jsonl and ensemble/ into the stage folder; returns the summary."""
    from korch.data.labelled import build_splits

    options = stage.options
    stage_dir = Path(ctx.stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    members = resolve_members(options, stage, ctx)
    splits = build_splits(stage.data, seed=stage.train.seed)
    rows = splits.validation
    if not rows:
        raise UserError(f"stage {stage.name}: the ensemble needs validation rows to weigh its members; set "
                        "data.validation_fraction above 0 or data.validation_inputs (and train_on_validation: false)")
    names = list(splits.labels.names)
    texts = [r.text for r in rows]
    pairs = [r.pair or "" for r in rows] if splits.text_pair_column else None
    labels = [r.label for r in rows]
    skipped = score_members(members, texts, pairs, labels, names, options.metric, options.batch_size)
    used = [m for m in members if m.chosen is not None]
    if not used:
        raise UserError(f"stage {stage.name}: no ensemble member could be used ({'; '.join(s['name'] + ': ' + s['reason'] for s in skipped)}); "
                        "train the member stages first or fix ensemble.members")
    by_weighting = {}  # every scheme side by side, so eval.json shows what the chosen one gained
    for scheme in ("uniform", "score", "optimize"):
        scheme_weights = _weights_for(scheme, used, labels, options.metric)
        by_weighting[scheme] = {k: v for k, v in classification_metrics(
            combine([m.probs for m in used], scheme_weights), labels, names).items() if k != "per_class_f1"}
        if scheme == options.weights:
            weights = scheme_weights
    mix = combine([m.probs for m in used], weights)
    ensemble_metrics = classification_metrics(mix, labels, names)
    member_metrics = {m.name: m.scores[m.chosen] for m in used}
    best = max(used, key=lambda m: (m.scores[m.chosen]["accuracy"]))

    records = [{"name": m.name, "path": str(m.path), "candidate": m.chosen, "validation": m.scores[m.chosen],
                "candidates": m.scores, "weight": w} for m, w in zip(used, weights)]
    _atomic_write(stage_dir / "weights.json", json.dumps(
        {"weights": options.weights, "metric": options.metric, "labels": names, "members": records,
         "skipped": skipped}, indent=1, ensure_ascii=False))
    _atomic_write(stage_dir / "eval.json", json.dumps(
        {"ensemble": ensemble_metrics, "members": member_metrics,
         "best_single": {"name": best.name, "accuracy": best.scores[best.chosen]["accuracy"]},
         "by_weighting": by_weighting,
         "weights": options.weights, "optimistic": options.weights == "optimize", "rows": len(rows)},
        indent=1, ensure_ascii=False))
    lines = []
    for i, (row, p) in enumerate(zip(rows, mix)):
        record = {"row": i, "row_id": row.row_id, "text": row.text, **({"pair": row.pair} if pairs else {}),
                  "label": names[row.label], "predicted": names[int(p.argmax())],
                  "probabilities": {n: float(x) for n, x in zip(names, p)}}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    _atomic_write(stage_dir / "predictions.jsonl", "".join(lines))
    write_ensemble_folder(stage_dir / "ensemble", names,
                          [{"name": m.name, "path": m.path, "weight": w} for m, w in zip(used, weights)])
    _log(f"{len(used)} member(s), validation accuracy {ensemble_metrics['accuracy']:.4f} "
          f"(best single: {best.name} {best.scores[best.chosen]['accuracy']:.4f})")
    return {"weights": {m.name: w for m, w in zip(used, weights)}, "candidates": {m.name: m.chosen for m in used},
            "skipped": [s["name"] for s in skipped], "accuracy": ensemble_metrics["accuracy"],
            "macro_f1": ensemble_metrics["macro_f1"], "loss": ensemble_metrics["loss"],
            "best_single_accuracy": best.scores[best.chosen]["accuracy"], "validation_rows": len(rows),
            "ensemble_dir": str(stage_dir / "ensemble")}


# --- loading an ensemble folder (korch predict) -----------------------------------------------------------------

@dataclass
class LoadedMember:
    name: str
    path: str
    weight: float
    max_length: int
    order: list[int]
    """For each ensemble label, the member's output column holding it."""


def is_ensemble(folder: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(folder, ENSEMBLE_FILE))


def load_ensemble(folder: str | os.PathLike, check: Callable[[str], tuple[list[str], int]] | None = None
                  ) -> tuple[list[str], list[LoadedMember]]:
    """Labels and usable members of an ensemble folder, reweighted to sum 1.

    A member whose folder is gone, whose weights file no longer has the recorded sha256, or that `check` (label
    names, max length of a model folder; default: `korch predict`'s check) rejects is skipped with a warning.
    """
    if check is None:
        from korch.predict import _check_model as check
    spec_file = Path(folder) / ENSEMBLE_FILE
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        labels, entries = [str(n) for n in spec["labels"]], list(spec["members"])
        if spec.get("format") != FORMAT or int(spec.get("version", 0)) > VERSION:
            raise ValueError(f"format {spec.get('format')!r} version {spec.get('version')!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{spec_file}: not a korch ensemble file ({_reason(exc)}); rerun the ensemble stage") from None
    usable = []
    for entry in entries:
        name = str(entry.get("name") or entry.get("path"))
        path = os.path.normpath(os.path.join(os.path.abspath(folder), str(entry.get("path", ""))))
        try:
            if not os.path.isdir(path):
                raise ValueError(f"no folder {path}")
            if sha256_of(model_file(path)) != entry.get("sha256"):
                raise ValueError(f"{model_file(path).name} in {path} changed since the ensemble was built (sha256 differs)")
            member_names, max_length = check(path)
            order = label_order(member_names, labels, "the ensemble's")
        except (UserError, OSError, ValueError) as exc:
            _log(f"skipping member {name}: {exc if isinstance(exc, (UserError, ValueError)) else _reason(exc)}")
            continue
        usable.append(LoadedMember(name, path, float(entry.get("weight", 1.0)), max_length, order))
    if not usable:
        raise UserError(f"{spec_file}: none of its {len(entries)} member(s) can be used (see the warnings above); "
                        "rerun the ensemble stage")
    for member, weight in zip(usable, normalise_weights([m.weight for m in usable])):
        member.weight = weight
    return labels, usable
