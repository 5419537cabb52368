"""`korch eval coref`: Real@1, Real@5 and LAMBADA@1 of a masked-LM folder on an entity-coreference dataset.

    korch eval coref --model runs/coref-mlm-1536/mlm/best --data scratch/c --limit 1600 --output scratch/e

- Real@k: in each block of the dataset's validation split (`korch.data.coref`), every later mention of a
  repeated entity is masked whole; a mention counts when every one of its gold tokens ranks first (real1) or
  within the top 5 (real5). The first `--limit` mentions are scored.
- LAMBADA@1: passages from the same held-out blocks, cut after the last word before a block's last full stop
  (`.`, `?`, `!`). That word is masked (as many [MASK]s as it has tokens) and must be recovered, all tokens
  exactly, from the context before it.
- `baseline_real1`: the frequency baseline, which always answers the training split's most common mention.

`eval.json` holds the three scores, `n` for each and the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Iterator, Sequence

from korch.errors import UserError

FULL_STOPS = (".", "?", "!")


def lambada_passage(ids: Sequence[int], word_starts: Sequence[int], stop_ids: set[int], mask_id: int,
                    sep_id: int) -> tuple[list[int], list[int]] | None:
    """(input ids ending in the masked last word + [SEP], the word's gold ids) for one block, or None when the
    block has no full stop preceded by a word. The word is the one just before the block's last full stop."""
    stops = [i for i in range(2, len(ids) - 1) if ids[i] in stop_ids]
    if not stops:
        return None
    end = stops[-1]
    start = max((w for w in word_starts if w < end), default=None)
    if start is None or start < 1 or ids[start] in stop_ids:
        return None
    return list(ids[:start]) + [mask_id] * (end - start) + [sep_id], list(ids[start:end])


def _rows(data_dir: str, manifest: dict, split: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for shard in manifest["shards"]:
        if shard["path"].startswith(split + "/"):
            yield from pq.read_table(os.path.join(data_dir, shard["path"])).to_pylist()


def evaluate_coref(model_dir: str, data_dir: str, limit: int | None = None, lambada_limit: int | None = None,
                   batch_size: int = 16) -> dict:
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from korch.data.coref import KIND
    from korch.data.pipeline import load_manifest
    from korch.models import load_pretrained
    from korch.tasks.coref_mlm import mask_mentions, per_mention
    from korch.tasks.mlm import pad_blocks

    manifest = load_manifest(data_dir)
    if manifest.get("kind") != KIND:
        raise UserError(f"--data {data_dir}: not an entity-coreference dataset; build one with `korch data coref`")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"--model {model_dir}: no config.json; give a Hugging Face model folder such as "
                        "runs/<job>/<stage>/best or checkpoint-<step>")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data_tokenizer = AutoTokenizer.from_pretrained(manifest["tokenizer"]) if os.path.isdir(manifest["tokenizer"]) else None
    if data_tokenizer is not None and data_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"--data {data_dir} was tokenized with {manifest['tokenizer']}, whose vocabulary differs from "
                        f"the model's; rebuild it with `korch data coref ... --tokenizer {model_dir}`")
    model = load_pretrained(model_dir, AutoModelForMaskedLM).eval()
    split = "validation" if manifest["splits"].get("validation", {}).get("rows") else "train"
    rows = list(_rows(data_dir, manifest, split))
    seq_len = max((len(r["input_ids"]) for r in rows), default=2)
    common = list(manifest.get("most_common_mention") or [])

    hits1: list[int] = []
    hits5: list[int] = []
    baseline: list[int] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            if limit is not None and len(hits1) >= limit:
                break
            chunk = [r for r in rows[i:i + batch_size] if any(r["mention_later"])]
            if not chunk:
                continue
            ids, attention = pad_blocks([r["input_ids"] for r in chunk], seq_len, tokenizer.pad_token_id)
            inputs, labels, index = mask_mentions(ids, [r["mention_starts"] for r in chunk],
                                                  [r["mention_ends"] for r in chunk],
                                                  [r["mention_later"] for r in chunk], tokenizer.mask_token_id)
            all1, all5, _ = per_mention(model(input_ids=inputs, attention_mask=attention).logits, labels, index)
            hits1 += all1.tolist()
            hits5 += all5.tolist()
            baseline += [int(r["input_ids"][s:e] == common) for r in chunk
                         for s, e, later in zip(r["mention_starts"], r["mention_ends"], r["mention_later"]) if later]
    if limit is not None:
        hits1, hits5, baseline = hits1[:limit], hits5[:limit], baseline[:limit]

    stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in FULL_STOPS} - {tokenizer.unk_token_id}
    lambada_limit = lambada_limit if lambada_limit is not None else limit
    correct = total = 0
    with torch.no_grad():
        for row in rows:
            if lambada_limit is not None and total >= lambada_limit:
                break
            passage = lambada_passage(row["input_ids"], row["word_starts"], stop_ids, tokenizer.mask_token_id,
                                      tokenizer.sep_token_id)
            if passage is None:
                continue
            inputs, gold = passage
            logits = model(input_ids=torch.tensor([inputs])).logits[0]
            predicted = logits[len(inputs) - 1 - len(gold): len(inputs) - 1].argmax(-1).tolist()
            correct += int(predicted == gold)
            total += 1
    n = len(hits1)
    return {
        "real1": sum(hits1) / n if n else None, "real5": sum(hits5) / n if n else None,
        "lambada1": correct / total if total else None,
        "n": {"real1": n, "real5": n, "lambada1": total},
        "baseline_real1": sum(baseline) / n if n else None,
        "baseline_mention": tokenizer.decode(common) if common else None,
        "split": split, "model": os.path.abspath(model_dir), "data": os.path.abspath(data_dir),
    }


def _cmd_eval_coref(args: argparse.Namespace) -> int:
    for flag, value in (("--limit", args.limit), ("--lambada-limit", args.lambada_limit)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: give a positive number of samples")
    if not os.path.isdir(args.model):
        raise UserError(f"--model {args.model}: no such folder; give a Hugging Face model folder such as "
                        "runs/<job>/<stage>/best")
    if not os.path.isdir(args.data):
        raise UserError(f"--data {args.data}: no such folder; build one with `korch data coref INPUT... --output DIR`")
    result = evaluate_coref(args.model, args.data, args.limit, args.lambada_limit)
    output = args.output or args.model
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    print(json.dumps({k: result[k] for k in ("real1", "real5", "lambada1", "n", "baseline_real1")}))
    return 0


def register_eval(evals) -> None:
    """`korch eval coref`, under the `eval` group that `korch.eval.commands` makes."""
    p = evals.add_parser("coref", help="Real@1/Real@5 on masked repeated mentions and LAMBADA@1 last-word prediction")
    p.add_argument("--model", required=True, metavar="DIR", help="masked-LM folder (final/, best/, checkpoint-<step>/)")
    p.add_argument("--data", required=True, metavar="PATH", help="a folder written by `korch data coref`")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score at most N mentions (and passages)")
    p.add_argument("--lambada-limit", type=int, default=None, metavar="N", help="LAMBADA passages (default: --limit)")
    p.add_argument("--output", default=None, metavar="DIR", help="where eval.json goes (default: the model folder)")
    p.set_defaults(func=_cmd_eval_coref)
