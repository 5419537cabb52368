"""`korch predict`: batch inference of a sequence classifier over a TSV/CSV/JSONL file, on Ray Data.

    korch predict --model runs/nsmc/cls/final --input reviews.tsv --output predictions.jsonl --workers 2

Flow: read the input on the driver (the labelled-data reader: TSV with quoting off) -> `from_items` in blocks
of `batch_size` rows -> `map_batches(_Classifier)` on an actor pool of `workers` actors (fractional CPUs, one
torch thread each), each loading the model and tokenizer once -> probabilities back on the driver, put in
input order by row index -> the output file, written to a temporary name and renamed.

Output: one row per input row (empty texts are predicted as ""; only lines that cannot be parsed, counted
on stderr, are left out), with `id` (the `--id-column`, default `id` when present, else the row index),
`label` (the argmax's `id2label` name) and the probabilities per label name: a `probabilities` object in
JSONL, one `prob_<name>` column per label in TSV/CSV.

An ensemble folder (`ensemble.json`, written by an `ensemble` stage) runs each member in turn the same way and
writes the weighted mean of their probabilities; members that are missing or whose weights changed (sha256)
are skipped with a warning and the rest reweighted (`korch.tasks.ensemble.load_ensemble`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import json
import math
import os
import sys
import time

from korch.errors import UserError

TEXT_COLUMNS = ("text", "document", "sentence", "comments")
ACTOR_CPUS = 0.5  # fractional, so N actors fit next to the driver on a 2-core machine (num_cpus=1 deadlocks)


class _Classifier:
    """Ray Data callable class: one model + tokenizer per actor, softmax probabilities per row."""

    def __init__(self, model_dir: str, max_length: int):
        import torch

        torch.set_num_threads(1)
        import korch  # noqa: F401 - importing korch registers its custom model classes with the Auto classes
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from korch.models import load_pretrained

        self.torch = torch
        self.model = load_pretrained(model_dir, AutoModelForSequenceClassification).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_length = max_length

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        texts = [str(t) for t in batch["text"]]
        pairs = [str(t) for t in batch["pair"]] if "pair" in batch else None
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt")
        with self.torch.no_grad():
            logits = self.model(**enc).logits
        probs = self.torch.softmax(logits.float(), dim=-1).numpy().astype(np.float64)
        return {"row": np.asarray(batch["row"], dtype=np.int64), "probs": list(probs)}


def _check_model(model_dir: str) -> tuple[list[str], int]:
    """Label names in id order and the max input length, read on the driver so a bad folder fails fast."""
    if not os.path.isdir(model_dir):
        raise UserError(f"--model {model_dir}: no such folder; give a Hugging Face model folder (e.g. runs/<job>/<stage>/final)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"--model {model_dir}: no config.json; give a folder written by korch or save_pretrained")
    if not any(os.path.isfile(os.path.join(model_dir, n)) for n in ("model.safetensors", "model.safetensors.index.json")):
        raise UserError(f"--model {model_dir}: no model.safetensors; korch loads safetensors only "
                        "(save with save_pretrained(safe_serialization=True))")
    import korch  # noqa: F401 - registers korch's model classes before AutoConfig looks the type up
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"--model {model_dir}: cannot read config.json ({exc})") from None
    names = [str(config.id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels)]
    return names, _max_length(model_dir, config)


def _max_length(model_dir: str, config) -> int:
    """Truncate as the model was trained: the tokenizer's `model_max_length` (korch sets it to the stage's
    seq_len, which is also what `pipeline(..., truncation=True)` uses), capped by the position table."""
    import json

    encoder = getattr(config, "encoder", None)  # korch's pooled classifier keeps the encoder's config inside
    positions = getattr(config, "max_position_embeddings", None) or getattr(encoder, "max_position_embeddings", None)
    limit = int(positions or 512)
    try:
        with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as handle:
            trained = json.load(handle).get("model_max_length")
    except (OSError, ValueError):
        trained = None
    if isinstance(trained, (int, float)) and 0 < trained < limit:
        limit = int(trained)
    return limit


def _read_input(path: str, text_column: str | None, pair_column: str | None, id_column: str | None,
                fmt: str, columns: list[str] | None):
    """(ids, texts, pairs or None, bad line count) in input order."""
    from korch.data.records import read_records, resolve_column

    if not os.path.isfile(path):
        raise UserError(f"--input {path}: no such file; give a TSV, CSV or JSONL file")
    bad: collections.Counter = collections.Counter()
    rf = read_records(path, fmt, columns, skipped=bad)
    text_col = resolve_column(rf, text_column, TEXT_COLUMNS, "--text-column")
    pair_col = resolve_column(rf, pair_column, (), "--text-pair-column") if pair_column else None
    id_col = resolve_column(rf, id_column, ("id",), "--id-column", required=id_column is not None)
    ids, texts, pairs = [], [], [] if pair_col else None
    for row_id, record in rf.records:
        if record is None:
            continue
        ids.append(record.get(id_col) if id_col else row_id)
        texts.append(_text(record.get(text_col)))
        if pairs is not None:
            pairs.append(_text(record.get(pair_col)))
    return ids, texts, pairs, bad["bad_line"]


def _text(value) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def _output_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return {".tsv": "tsv", ".csv": "csv"}.get(ext, "jsonl")


def _write_output(path: str, ids: list, names: list[str], probs) -> None:
    fmt = _output_format(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if fmt == "jsonl":
                for id_, p in zip(ids, probs):
                    row = {"id": id_, "label": names[int(p.argmax())],
                           "probabilities": {n: float(x) for n, x in zip(names, p)}}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            else:
                if fmt == "tsv":  # quoting off, like the inputs: tabs and newlines in an id become spaces
                    def put(cells):
                        f.write("\t".join(str(c).replace("\t", " ").replace("\n", " ") for c in cells) + "\n")
                else:
                    put = csv.writer(f).writerow
                put(["id", "label", *(f"prob_{n}" for n in names)])
                for id_, p in zip(ids, probs):
                    put([id_, names[int(p.argmax())], *(repr(float(x)) for x in p)])
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def predict(model_dir: str, input_path: str, output_path: str, workers: int = 2, batch_size: int = 32,
            text_column: str | None = None, text_pair_column: str | None = None, id_column: str | None = None,
            fmt: str = "auto", columns: list[str] | None = None, progress: bool = True) -> dict:
    """Classify every row of `input_path` with the model in `model_dir`; write `output_path`; return a summary.

    Uses the running Ray if there is one, else starts a private local Ray and shuts it down after.
    """
    import numpy as np

    if workers < 1 or batch_size < 1:
        raise UserError("--workers and --batch-size must be at least 1")
    model_dir = os.path.abspath(model_dir)
    if os.path.exists(output_path) and os.path.exists(input_path) and os.path.samefile(output_path, input_path):
        raise UserError(f"--output {output_path} is the --input file; predictions would replace it, so give another "
                        "path")
    names, members = _load_members(model_dir)
    ids, texts, pairs, bad_lines = _read_input(input_path, text_column, text_pair_column, id_column, fmt, columns)
    if bad_lines:
        print(f"[korch] predict: {bad_lines} line(s) of {input_path} could not be parsed (wrong field count or "
              "invalid JSON) and get no prediction", file=sys.stderr, flush=True)
    n = len(texts)
    probs = np.zeros((n, len(names)), dtype=np.float64)
    started = time.perf_counter()
    if n:
        with _local_ray(workers):
            parts = []
            for member in members:
                if progress and len(members) > 1:
                    print(f"[korch] predict: ensemble member {member.name} (weight {member.weight:.4f})",
                          file=sys.stderr, flush=True)
                part = np.zeros((n, len(member.order)), dtype=np.float64)
                _run(member.path, member.max_length, texts, pairs, workers, batch_size, part, progress)
                parts.append(part[:, member.order])
        from korch.tasks.ensemble import combine

        probs = combine(parts, [m.weight for m in members])
    _write_output(output_path, ids, names, probs)
    summary = {"rows": n, "bad_lines": bad_lines, "labels": names, "output": output_path,
               "seconds": round(time.perf_counter() - started, 2)}
    if len(members) > 1 or members[0].path != model_dir:
        summary["members"] = {m.name: m.weight for m in members}
    if progress:
        print(f"[korch] predict: wrote {n} predictions to {output_path} in {summary['seconds']}s", file=sys.stderr, flush=True)
    return summary


def _load_members(model_dir: str):
    """Label names and the models to run: the folder itself, or the members of an ensemble folder (ensemble.json)."""
    from korch.tasks.ensemble import LoadedMember, is_ensemble, load_ensemble

    if is_ensemble(model_dir):
        return load_ensemble(model_dir, check=_check_model)
    names, max_length = _check_model(model_dir)
    return names, [LoadedMember(os.path.basename(model_dir), model_dir, 1.0, max_length, list(range(len(names))))]


@contextlib.contextmanager
def _local_ray(workers: int):
    """The running Ray if there is one, else a private local Ray shut down on exit; checks the CPUs suffice."""
    import ray

    ray_started = False
    if not ray.is_initialized():
        from korch.train.job import init_local_ray

        init_local_ray(max(2, math.ceil(workers * ACTOR_CPUS) + 1))
        ray_started = True
    try:
        have = ray.cluster_resources().get("CPU", 0)
        if workers * ACTOR_CPUS > have:
            raise UserError(f"--workers {workers} needs {workers * ACTOR_CPUS:g} CPUs, but the Ray cluster has "
                            f"{have:g}; lower --workers")
        yield
    finally:
        if ray_started:
            ray.shutdown()


def _run(model_dir, max_length, texts, pairs, workers, batch_size, probs, progress) -> None:
    import numpy as np
    import ray

    ctx = ray.data.DataContext.get_current()
    order, bars = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # the `n/N rows` line below is the progress display
    try:
        items = [{"row": i, "text": t} if pairs is None else {"row": i, "text": t, "pair": pairs[i]}
                 for i, t in enumerate(texts)]
        blocks = max(1, math.ceil(len(items) / batch_size))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        # No more actors than blocks: each loads the model, and Ray Data warns about a pool it cannot fill.
        ds = ds.map_batches(_Classifier, fn_constructor_args=(model_dir, max_length), batch_size=batch_size,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=min(workers, blocks)),
                            num_cpus=ACTOR_CPUS)
        done, last, total = 0, time.perf_counter(), len(texts)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows = batch["row"]
            if len(rows):
                probs[rows] = np.stack(list(batch["probs"]))
            done += len(rows)
            if progress and (time.perf_counter() - last > 2.0 or done == total):
                last = time.perf_counter()
                print(f"[korch] predict: {done}/{total} rows", file=sys.stderr, flush=True)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = order, bars


def _cmd_predict(args: argparse.Namespace) -> int:
    predict(args.model, args.input, args.output, workers=args.workers, batch_size=args.batch_size,
            text_column=args.text_column, text_pair_column=args.text_pair_column, id_column=args.id_column,
            fmt=args.format, columns=args.columns.split(",") if args.columns else None)
    return 0


def register(sub) -> None:
    p = sub.add_parser("predict", help="classify a TSV/CSV/JSONL file with a trained model on a Ray Data actor pool")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="Hugging Face sequence-classification folder (safetensors), or an ensemble stage's ensemble/ folder")
    p.add_argument("--input", required=True, metavar="FILE", help="TSV (quoting off), CSV or JSONL with a header / keys")
    p.add_argument("--output", required=True, metavar="FILE", help="predictions: .jsonl (default), .tsv or .csv")
    p.add_argument("--workers", type=int, default=2, help="model actors (each loads the model once; 0.5 CPU each)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--text-column", default=None, help="default: the first of text, document, sentence, comments")
    p.add_argument("--text-pair-column", default=None, help="second text for sentence-pair models")
    p.add_argument("--id-column", default=None, help="copied to the output's `id`; default: `id` if present, else the row index")
    p.add_argument("--format", default="auto", choices=["auto", "tsv", "csv", "jsonl", "parquet"],
                   help="input format (default: by extension)")
    p.add_argument("--columns", default=None, metavar="A,B", help="column names of a header-less TSV/CSV")
    p.set_defaults(func=_cmd_predict)


def main_args(argv: list[str]) -> int:
    """Run `korch predict ARGS` (without the leading `predict`) through the CLI: a UserError is one line, exit 2."""
    from korch.cli import main

    return main(["predict", *argv])
