"""Sentence-embedding evaluation: `korch eval embed --model DIR --pairs FILE [--output DIR]`.

The seed pipeline scored each stage by three numbers: the mean cosine of similar pairs, the mean cosine of
different pairs, and the gap between them. Those are here, plus Spearman against gold scores for KorSTS-format
files (score 0-5): "similar" is a score >= `sim_min` (4), "different" a score <= `diff_max` (1). KorNLI-format
files (gold_label) count entailment as similar and contradiction as different and have no Spearman.

The metric functions are pure (lists in, numbers out) and tested as data; `encode` is the one place that turns
a model folder into vectors, and the sentence-transformers export (`write_sentence_transformers_files`) makes
`SentenceTransformer(final/)` pool exactly as `encode` does.

Pooling `idf` is the mean of the token vectors weighted by each token's inverse document frequency over the
stage's training sentences (`idf_weights`), so that particles and endings shared by most Korean sentences count
less than the content words that tell two sentences apart. The weights travel with the model as
sentence-transformers' `WordWeights` module (`1_WordWeights/config.json`), which multiplies each token vector
by its weight before a mean pooling that divides by the weights' sum: the same number `pool` computes.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from korch.errors import UserError

if TYPE_CHECKING:
    import torch

POOLINGS = ("cls", "mean", "idf")


@dataclass(frozen=True)
class Pairs:
    first: list[str]
    second: list[str]
    scores: list[float] | None
    """Gold similarity (KorSTS 0-5); None for label files."""
    labels: list[str] | None
    """Gold labels (KorNLI entailment/neutral/contradiction); None for score files."""


def read_pairs(path: str, limit: int | None = None) -> Pairs:
    """A headed TSV with sentence1, sentence2 and either `score` (KorSTS) or `gold_label` (KorNLI).

    Quoting is off: KorSTS holds literal `"` inside fields."""
    from korch.data.readers import check_utf8_file

    try:
        check_utf8_file(path)  # a CP949 file is one line naming it, not a UnicodeDecodeError traceback
        handle = open(path, encoding="utf-8", newline="")
    except OSError as exc:
        raise UserError(f"--pairs {path}: cannot read it ({exc.strerror}); give a KorSTS or KorNLI TSV, "
                        "e.g. ../shared/data/korsts/sts-dev.tsv") from None
    with handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None) or []
        if "sentence1" not in header or "sentence2" not in header or not ({"score", "gold_label"} & set(header)):
            raise UserError(f"{path}: the header needs sentence1, sentence2 and score (KorSTS) or gold_label "
                            f"(KorNLI); found {', '.join(header) or 'nothing'}")
        a, b = header.index("sentence1"), header.index("sentence2")
        key = "score" if "score" in header else "gold_label"
        k = header.index(key)
        first, second, values = [], [], []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(a, b, k):
                raise UserError(f"{path}:{line}: {len(row)} tab-separated fields, the header has {len(header)}; "
                                "fix or remove the line")
            value: float | str = row[k].strip()
            if key == "score":
                try:
                    value = float(value)
                except ValueError:
                    raise UserError(f"{path}:{line}: score '{row[k]}' is not a number") from None
            first.append(row[a])
            second.append(row[b])
            values.append(value)
            if limit is not None and len(first) >= limit:
                break
    if not first:
        raise UserError(f"{path}: no pairs after the header")
    return Pairs(first, second, values if key == "score" else None, values if key == "gold_label" else None)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of the ranks, ties given their average rank (as scipy does)."""
    rx, ry = _ranks(x), _ranks(y)
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    vy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (vx * vy) if vx and vy else float("nan")


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pair_metrics(cosines: Sequence[float], scores: Sequence[float] | None = None, labels: Sequence[str] | None = None,
                 sim_min: float = 4.0, diff_max: float = 1.0) -> dict:
    """sim_mean, diff_mean, gap (= sim_mean - diff_mean), and spearman when gold scores are given."""
    if scores is not None:
        similar = [c for c, s in zip(cosines, scores) if s >= sim_min]
        different = [c for c, s in zip(cosines, scores) if s <= diff_max]
    elif labels is not None:
        similar = [c for c, lab in zip(cosines, labels) if lab == "entailment"]
        different = [c for c, lab in zip(cosines, labels) if lab == "contradiction"]
    else:
        raise ValueError("give scores or labels")
    sim = sum(similar) / len(similar) if similar else float("nan")
    diff = sum(different) / len(different) if different else float("nan")
    result = {"sim_mean": sim, "diff_mean": diff, "gap": sim - diff, "pairs": len(cosines),
              "similar_pairs": len(similar), "different_pairs": len(different)}
    if scores is not None:
        result.update(spearman=spearman(cosines, scores), sim_min=sim_min, diff_max=diff_max)
    return result


# --- model folders ---------------------------------------------------------------------------------------------

def pool(hidden: "torch.Tensor", attention_mask: "torch.Tensor", pooling: str,
         token_weights: "torch.Tensor | None" = None) -> "torch.Tensor":
    """One vector per row: the first token (`cls`), the mean over real tokens (`mean`, padding never counts), or
    their mean weighted by `token_weights` (`idf`: one weight per position, e.g. `weights[input_ids]`)."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype)
    if pooling == "idf":
        if token_weights is None:
            raise ValueError("pooling idf needs token_weights (one weight per position)")
        mask = mask * token_weights.to(hidden.dtype)
    mask = mask.unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def idf_weights(token_ids: Iterable[Sequence[int]], vocab_size: int) -> list[float]:
    """Smoothed inverse document frequency of every id, each row of `token_ids` one document (a sentence):
    log((n + 1) / (df + 1)) + 1, as scikit-learn's TfidfVectorizer. Ids never seen get the largest weight
    (a rare token is informative); ids in every row (CLS, SEP) get 1."""
    df = [0] * vocab_size
    n = 0
    for ids in token_ids:
        n += 1
        for i in set(ids):
            if 0 <= i < vocab_size:
                df[i] += 1
    return [math.log((n + 1) / (d + 1)) + 1 for d in df]


def _modules(folder: str) -> list[dict]:
    path = Path(folder) / "modules.json"
    return json.loads(path.read_text()) if path.exists() else []


def folder_pooling(folder: str) -> str:
    """The pooling a sentence-transformers folder declares: `idf` with a WordWeights module, else what its
    Pooling config says; `cls` for a folder with no sentence-transformers files."""
    modules = _modules(folder)
    if any(m["type"].endswith("WordWeights") for m in modules):
        return "idf"
    pooling_dir = next((m["path"] for m in modules if m["type"].endswith("Pooling")), "1_Pooling")
    config = Path(folder) / pooling_dir / "config.json"
    if not config.exists():
        return "cls"
    return "mean" if json.loads(config.read_text()).get("pooling_mode_mean_tokens") else "cls"


def load_token_weights(folder: str) -> "torch.Tensor | None":
    """The per-id weights of an `idf` folder (its WordWeights config, in tokenizer id order); None otherwise."""
    import torch

    module = next((m for m in _modules(folder) if m["type"].endswith("WordWeights")), None)
    if module is None:
        return None
    config = json.loads((Path(folder) / module["path"] / "config.json").read_text())
    weights, unknown = config["word_weights"], config.get("unknown_word_weight", 1.0)
    return torch.tensor([weights.get(token, unknown) for token in config["vocab"]], dtype=torch.float32)


def write_sentence_transformers_files(folder: str, pooling: str, hidden_size: int, max_seq_length: int,
                                      token_weights: Sequence[float] | None = None, tokenizer=None) -> None:
    """modules.json + pooling config: `SentenceTransformer(folder)` then loads the HF encoder with this pooling.

    `idf` also needs `token_weights` (one per id of `tokenizer`), written as a WordWeights module between the
    encoder and a mean pooling."""
    root = Path(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    if pooling == "idf":
        if token_weights is None or tokenizer is None:
            raise ValueError("pooling idf needs token_weights and the tokenizer they index")
        vocab = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
        if len(vocab) != len(token_weights):
            raise ValueError(f"{len(token_weights)} token weights for a vocabulary of {len(vocab)}")
        (root / "1_WordWeights").mkdir(parents=True, exist_ok=True)
        (root / "1_WordWeights" / "config.json").write_text(json.dumps({
            "vocab": vocab, "word_weights": dict(zip(vocab, map(float, token_weights))),
            "unknown_word_weight": float(max(token_weights))}, ensure_ascii=False))
        modules.append({"idx": 1, "name": "1", "path": "1_WordWeights",
                        "type": "sentence_transformers.models.WordWeights"})
    pooling_dir = f"{len(modules)}_Pooling"
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": pooling_dir,
                    "type": "sentence_transformers.models.Pooling"})
    (root / pooling_dir).mkdir(parents=True, exist_ok=True)
    (root / "modules.json").write_text(json.dumps(modules, indent=1))
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                 "do_lower_case": False}))
    (root / pooling_dir / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden_size, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling != "cls", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True}, indent=1))


def load_encoder(folder: str):
    """(model, tokenizer, pooling, max_length) of an exported stage folder; safetensors only. An `idf` folder's
    weights come from `load_token_weights`."""
    from transformers import AutoTokenizer

    from korch.models.encoder import load_encoder_folder

    if not (Path(folder) / "config.json").exists():
        raise UserError(f"--model {folder}: no config.json there; give a stage's final/ folder, "
                        "e.g. runs/<job>/<stage>/final")
    model = load_encoder_folder(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    st_config = Path(folder) / "sentence_bert_config.json"
    max_length = json.loads(st_config.read_text())["max_seq_length"] if st_config.exists() else 128
    return model, tokenizer, folder_pooling(folder), int(max_length)


def encode(model, tokenizer, texts: Sequence[str], pooling: str, max_length: int = 128,
           batch_size: int = 64, token_weights: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Pooled embeddings (not normalised), in input order; `idf` pooling weighs positions by `token_weights[id]`."""
    import torch

    vectors = []
    device = next(model.parameters()).device
    token_weights = token_weights.to(device) if token_weights is not None else None
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            batch.pop("token_type_ids", None)
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = model(**batch).last_hidden_state
            weights = token_weights[batch["input_ids"]] if token_weights is not None else None
            vectors.append(pool(hidden, batch["attention_mask"], pooling, weights).float().cpu())
    return torch.cat(vectors)


def cosine_rows(a: "torch.Tensor", b: "torch.Tensor") -> list[float]:
    import torch

    return torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()


def check_thresholds(pairs: Pairs, path: str, sim_min: float, diff_max: float) -> None:
    """A `UserError` when no gold score is similar (>= sim_min) or none different (<= diff_max): sim_mean or
    diff_mean, and so the gap a guard compares, would be NaN."""
    if pairs.scores is None:
        return
    low, high = min(pairs.scores), max(pairs.scores)
    if diff_max >= sim_min:
        raise UserError(f"diff_max {diff_max:g} is not below sim_min {sim_min:g}; a pair cannot be both similar and "
                        "different")
    if high < sim_min:
        raise UserError(f"sim_min {sim_min:g}: no pair in {path} scores that high (scores run {low:g}-{high:g}); "
                        "lower it")
    if low > diff_max:
        raise UserError(f"diff_max {diff_max:g}: no pair in {path} scores that low (scores run {low:g}-{high:g}); "
                        "raise it")


def evaluate_folder(folder: str, pairs_path: str, sim_min: float = 4.0, diff_max: float = 1.0,
                    limit: int | None = None) -> dict:
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: give at least 1, or leave it out to score every pair")
    pairs = read_pairs(pairs_path, limit)  # a bad pairs file fails before seconds of model loading
    check_thresholds(pairs, pairs_path, sim_min, diff_max)
    model, tokenizer, pooling, max_length = load_encoder(folder)
    weights = load_token_weights(folder)
    first = encode(model, tokenizer, pairs.first, pooling, max_length, token_weights=weights)
    second = encode(model, tokenizer, pairs.second, pooling, max_length, token_weights=weights)
    metrics = pair_metrics(cosine_rows(first, second), pairs.scores, pairs.labels, sim_min, diff_max)
    return {**metrics, "pooling": pooling, "pairs_file": os.path.abspath(pairs_path), "model": os.path.abspath(folder)}


# --- the per-stage comparison table -------------------------------------------------------------------------

TABLE_COLUMNS = ("sim_mean", "diff_mean", "gap", "spearman")


def format_stage_table(rows: dict[str, dict]) -> str | None:
    """The seed pipeline's table: one row per stage with an embedding evaluation, the guard's verdict last."""
    scored = {name: row for name, row in rows.items() if isinstance(row, dict) and "gap" in row}
    if not scored:
        return None
    lines = [f"{'stage':16s} " + " ".join(f"{c:>9s}" for c in TABLE_COLUMNS) + "  verdict"]
    for name, row in scored.items():
        cells = " ".join(f"{row[c]:9.4f}" if isinstance(row.get(c), (int, float)) else f"{'-':>9s}"
                         for c in TABLE_COLUMNS)
        lines.append(f"{name:16s} {cells}  {row.get('verdict', '')}")
    return "\n".join(lines)


# --- CLI ---------------------------------------------------------------------------------------------------

def _cmd_eval_embed(args) -> int:
    result = evaluate_folder(args.model, args.pairs, args.sim_min, args.diff_max, args.limit)
    output = Path(args.output or args.model)
    output.mkdir(parents=True, exist_ok=True)
    (output / "eval.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(json.dumps({k: result[k] for k in (*TABLE_COLUMNS, "pairs") if k in result}))
    return 0


def register_eval(group) -> None:
    """`korch eval embed`, under the `eval` group that `korch.eval.commands` makes."""
    p = group.add_parser("embed", help="cosine sim/diff means, their gap and Spearman on sentence pairs; writes eval.json")
    p.add_argument("--model", required=True, help="a stage's final/ folder (HF encoder + sentence-transformers pooling)")
    p.add_argument("--pairs", required=True, help="KorSTS TSV (score 0-5) or KorNLI TSV (gold_label)")
    p.add_argument("--output", default=None, help="folder for eval.json (default: the model folder)")
    p.add_argument("--sim-min", type=float, default=4.0, help="scores >= this count as similar (default 4)")
    p.add_argument("--diff-max", type=float, default=1.0, help="scores <= this count as different (default 1)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N pairs")
    p.set_defaults(func=_cmd_eval_embed)
