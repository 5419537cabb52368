"""CLI: `korch data prepare INPUT... --output DIR` and `korch bench data`."""

from __future__ import annotations

import argparse
import json
import os

from korch.errors import UserError

DEFAULT_BENCH_CORPUS = ["../shared/data/kowiki_sample", "../shared/data/korean_petitions"]


def build_data_config(inputs: list[str], config_file: str | None, overrides: dict):
    """DataConfig from an optional YAML (DataConfig fields, at top level or under `data:`) plus CLI values."""
    from pydantic import ValidationError

    from korch.config import DataConfig, format_validation_error, parse_yaml

    raw: dict = {}
    source = config_file or "command line"
    if config_file:
        try:
            with open(config_file, encoding="utf-8") as f:
                loaded = parse_yaml(f.read(), config_file)
        except OSError as exc:
            raise UserError(f"--config {config_file}: cannot read it ({exc.strerror}); give a YAML of data fields") from None
        section = (loaded or {}).get("data", loaded) if isinstance(loaded or {}, dict) else loaded
        if not isinstance(section or {}, dict):
            raise UserError(f"{config_file}: expected a mapping of data fields (seq_len, morphemes, ...)")
        raw = dict(section or {})
    if inputs:
        raw["inputs"] = list(inputs)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    for key in raw:
        if key not in DataConfig.model_fields:
            import difflib

            close = difflib.get_close_matches(key, list(DataConfig.model_fields), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(f"{source}: unknown data field '{key}'; {hint}allowed: {', '.join(DataConfig.model_fields)}")
    try:
        return DataConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError("\n".join(f"{source}: {p}" for p in format_validation_error(exc, raw, DataConfig))) from None


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .pipeline import check_counts, prepare_corpus
    from .readers import check_output_apart, corpus_files, describe_skips

    cfg = build_data_config(args.inputs, args.config, {"seq_len": args.seq_len, "format": args.format})
    corpus_files(list(cfg.inputs), cfg.format)  # no corpus, or a file that is not UTF-8: fail before a tokenizer is trained
    output = os.path.abspath(args.output)
    check_output_apart(list(cfg.inputs), output)
    tokenizer_dir = _tokenizer_for(output, args.tokenizer, cfg, args.vocab_size, args.tokenizer_docs)
    manifest = prepare_corpus(cfg, tokenizer_dir, output, progress=not args.quiet)
    problems = check_counts(manifest)
    summary = {k: manifest[k] for k in ("docs_in", "docs_out", "tokens", "rows", "skipped", "splits")}
    print(f"[korch] prepared {output}: {json.dumps(summary, ensure_ascii=False)}")
    if problems:  # would be a korch bug, not a user error
        print("[korch] manifest counts do not add up: " + "; ".join(problems))
        return 1
    if not manifest["docs_out"]:  # nothing to train on: the inputs or the filters are wrong
        raise UserError(f"{', '.join(cfg.inputs)}: no document survived ({manifest['docs_in']} read; skipped: "
                        f"{describe_skips(manifest['skipped'])}); check the inputs, min_doc_chars and max_line_chars")
    return 0


def _tokenizer_for(output: str, tokenizer_dir: str | None, cfg, vocab_size: int, docs: int,
                   pre_tokenize: str = "whitespace") -> str:
    """`--tokenizer`, else one trained on the inputs into OUTPUT/tokenizer (reused when already there)."""
    if tokenizer_dir is None:
        from .tokenizer import tokenizer_problem

        tokenizer_dir = os.path.join(output, "tokenizer")
        cached = os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json"))
        problem = tokenizer_problem(tokenizer_dir) if cached else None
        if problem:  # korch's own, cut short by a crash or a full disk: learn it again
            print(f"[korch] {problem}; training it again", flush=True)
        if not cached or problem:
            from .readers import vocabulary_texts
            from .tokenizer import train_wordpiece

            print(f"[korch] no --tokenizer given: training a WordPiece vocabulary ({vocab_size}) into {tokenizer_dir}",
                  flush=True)
            train_wordpiece(vocabulary_texts(list(cfg.inputs), cfg, docs), tokenizer_dir, vocab_size, 2, pre_tokenize)
    elif not os.path.isdir(tokenizer_dir):
        raise UserError(f"--tokenizer '{tokenizer_dir}' is not a folder; give a Hugging Face tokenizer folder or leave it out")
    return tokenizer_dir


def _cmd_coref(args: argparse.Namespace) -> int:
    from .coref import build_coref_dataset
    from .readers import check_output_apart

    cfg = build_data_config(args.inputs, None, {"seq_len": args.seq_len, "max_docs": args.max_docs,
                                                "validation_fraction": args.validation_fraction})
    output = os.path.abspath(args.output)
    check_output_apart(list(cfg.inputs), output)
    tokenizer_dir = _tokenizer_for(output, args.tokenizer, cfg, args.vocab_size, args.tokenizer_docs, args.pre_tokenize)
    manifest = build_coref_dataset(cfg, tokenizer_dir, output, progress=not args.quiet)
    splits = manifest["splits"]
    print(f"{manifest['mentions']} mentions ({splits['train']['mentions']} train, {splits['validation']['mentions']} "
          f"validation) in {manifest['rows']} blocks of {manifest['docs_out']} documents -> {output}")
    return 0


def register(sub) -> None:
    data = sub.add_parser("data", help="corpus tools").add_subparsers(dest="data_cmd", required=True, metavar="CMD")
    p = data.add_parser("coref", help="build the entity-coreference dataset (repeated proper-noun mentions per block); "
                        "prints N mentions")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="corpus files, folders or globs (txt/jsonl/parquet/wiki)")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--seq-len", type=int, default=None, metavar="N", help="tokens per block (default 128)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="Hugging Face fast tokenizer folder; default: train "
                   "one into OUTPUT/tokenizer")
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size when training a tokenizer")
    p.add_argument("--pre-tokenize", choices=["whitespace", "morphemes"], default="whitespace",
                   help="what a trained tokenizer learns its vocabulary from")
    p.add_argument("--tokenizer-docs", type=int, default=50_000, help="train the tokenizer on at most this many documents")
    p.add_argument("--max-docs", type=int, default=None, metavar="N", help="read at most N documents")
    p.add_argument("--validation-fraction", type=float, default=0.1, metavar="F",
                   help="share of documents held out (by text hash) for evaluation (default 0.1)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_coref)
    p = data.add_parser("prepare", help="clean, sentence-split (Kiwi), tokenize and pack a corpus into parquet shards + manifest.json")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders, globs or URIs (s3://, gs://) of txt/jsonl/parquet/wiki")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--seq-len", type=int, default=None, metavar="N", help="tokens per packed block (default 128)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="Hugging Face fast tokenizer folder; default: train one into OUTPUT/tokenizer")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML with data fields (morphemes, dedup, min_doc_chars, ...)")
    p.add_argument("--format", default=None, choices=["auto", "txt", "lines", "jsonl", "parquet", "wiki", "tsv"])
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size when training a tokenizer")
    p.add_argument("--tokenizer-docs", type=int, default=50_000, help="train the tokenizer on at most this many documents")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_prepare)


def _cmd_bench(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from korch.config import DataConfig

    from .bench import run_bench

    corpus = args.corpus or DEFAULT_BENCH_CORPUS
    try:  # before any engine starts, so a bad path is one line, not a child's traceback
        DataConfig(inputs=corpus)
    except ValidationError as exc:
        raise UserError("--corpus: " + "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
    result = run_bench(corpus, scale=args.scale, max_docs=args.docs,
                       actors=args.actors, skip_10x=args.skip_10x, workdir=args.workdir,
                       repeat=args.repeat)
    print(json.dumps(result))
    return 0


def register_bench(bench) -> None:
    p = bench.add_parser("data", help="docs/s and peak RSS: single process vs linecache vs korch Ray Data vs Kiwi threads")
    p.add_argument("--corpus", nargs="+", default=None, metavar="PATH", help=f"default: {' '.join(DEFAULT_BENCH_CORPUS)}")
    p.add_argument("--scale", type=int, default=1, metavar="N", help="base corpus = N perturbed copies of the corpus")
    p.add_argument("--docs", type=int, default=None, metavar="N", help="use only the first N documents of the corpus per copy")
    p.add_argument("--actors", type=int, default=None, help="Kiwi actors (default: sized to the free CPUs, as korch run does)")
    p.add_argument("--skip-10x", action="store_true", help="skip the 10x-corpus memory run (rss_growth_10x is null)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the engines N times, interleaved, keeping each one's best docs/s (noisy shared machines)")
    p.add_argument("--workdir", default=None, help="where generated corpora go (default: a temp folder, removed after)")
    p.set_defaults(func=_cmd_bench)
