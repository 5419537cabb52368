"""`korch bench train`: korch's training path against a plain torch loop, side by side in one run.

All three runs use the same tiny BERT, the same packed rows (korch's own data pipeline on the same corpus), the
same micro batch, masking and AdamW, and one torch thread per worker. Throughput is measured after warm-up:
both sides time 5-step windows after the first `WARMUP_STEPS` and report the median window, which keeps a
burst of load from another process on a small machine from deciding the ratio. Start-up (Ray, workers,
DeepSpeed init, the data pipeline's first block) is reported separately as `startup_s`.
Then 2-worker runs under ZeRO 0-3 report the optimizer state each worker holds.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_CORPUS = ["../shared/data/kowiki_sample"]
WARMUP_STEPS = 20
WINDOW = 5


def _stage(name: str, corpus: list[str], steps: int, workers: int, zero: int, micro: int, seq_len: int, tokenizer: str | None):
    from korch.config import StageConfig

    return StageConfig.model_validate({
        "name": name, "task": "mlm",
        "model": {"arch": "bert", "size": "tiny"},
        "tokenizer": {"vocab_size": 4000, **({"path": tokenizer} if tokenizer else {})},
        "data": {"inputs": corpus, "seq_len": seq_len, "validation_fraction": 0.0, "max_docs": 400},
        "train": {"max_steps": steps, "micro_batch_size": micro, "lr": 1e-3, "log_every_steps": WINDOW, "seed": 7},
        "eval": {"every": "never"},
        "distributed": {"num_workers": workers, "cpus_per_worker": 1, "deepspeed": {"zero_stage": zero}},
    })


def _steady_rate(stage_dir: Path) -> tuple[float, float]:
    """(median samples/s of the windows after warm-up, wall seconds those windows took)."""
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if r["step"] > WARMUP_STEPS] or rows[-1:]
    start = max((r["time"] for r in rows if r["step"] <= WARMUP_STEPS), default=steady[0]["time"])
    return statistics.median(r["samples_per_s"] for r in steady), steady[-1]["time"] - start


def torch_baseline(prepared: str, tokenizer_dir: str, steps: int, micro: int, seq_len: int, seed: int = 7) -> float:
    """The loop a user would hand-write: same model, rows, masking and AdamW, one process, no Ray or DeepSpeed."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from korch.config import ModelConfig
    from korch.models import build_mlm_model
    from korch.tasks.mlm import mask_tokens, masking_generator, pad_blocks

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = []
    for shard in sorted(Path(prepared, "train").glob("*.parquet")):
        rows += pq.read_table(shard, columns=["input_ids"]).column("input_ids").to_pylist()
    torch.manual_seed(seed)
    model = build_mlm_model(ModelConfig(), len(tokenizer), seq_len, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    specials = sorted(set(tokenizer.all_special_ids))
    model.train()
    rates, window_start = [], time.perf_counter()
    for step in range(steps):
        block = [rows[(step * micro + i) % len(rows)] for i in range(micro)]
        ids, attention = pad_blocks(block, seq_len, tokenizer.pad_token_id)
        inputs, labels = mask_tokens(ids, attention, specials, tokenizer.mask_token_id, len(tokenizer), 0.15,
                                     masking_generator(seed, 0, step, 0))
        loss = model(input_ids=inputs, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % WINDOW == 0:
            now = time.perf_counter()
            if step + 1 > WARMUP_STEPS:
                rates.append(WINDOW * micro / (now - window_start))
            window_start = now
    return statistics.median(rates)


def run_bench(corpus: list[str], steps: int = 80, micro: int = 16, seq_len: int = 128, zero_steps: int = 5) -> dict:
    from korch.train.job import init_local_ray
    from korch.tasks.mlm import MlmTask
    from korch.train.runner import StageContext, resolve_tokenizer, run_training_stage

    import ray

    work = Path(tempfile.mkdtemp(prefix="korch-bench-train-"))
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    init_local_ray(max(4, os.cpu_count() or 1))
    try:
        base = _stage("prep", corpus, steps, 1, 0, micro, seq_len, None)
        base_ctx = StageContext(stage_dir=work / "prep")
        base_ctx.stage_dir.mkdir(parents=True)
        tokenizer = resolve_tokenizer(base, base_ctx, MlmTask)
        prepared = MlmTask.prepare_data(base, base_ctx, tokenizer)
        print("[bench] torch baseline", flush=True)
        torch_rate = torch_baseline(prepared, tokenizer, steps, micro=micro, seq_len=seq_len)
        print(f"[bench] torch: {torch_rate:.1f} samples/s", flush=True)
        results: dict[str, dict] = {}
        for label, workers, zero, count in [("korch1", 1, 0, steps), ("korch2", 2, 2, steps),
                                            ("zero0", 2, 0, zero_steps), ("zero1", 2, 1, zero_steps), ("zero3", 2, 3, zero_steps)]:
            print(f"[bench] {label}: {workers} worker(s), ZeRO-{zero}, {count} steps", flush=True)
            stage = _stage(label, [prepared], count, workers, zero, micro, seq_len, tokenizer)
            ctx = StageContext(stage_dir=work / label, tokenizer_dir=tokenizer)
            ctx.stage_dir.mkdir(parents=True)
            began = time.perf_counter()
            summary = run_training_stage(stage, ctx)
            wall = time.perf_counter() - began
            rate, steady_seconds = _steady_rate(ctx.stage_dir)
            results[label] = {"rate": rate, "startup_s": max(0.0, wall - steady_seconds), **summary}
            print(f"[bench] {label}: {rate:.1f} samples/s, {wall:.0f} s wall", flush=True)
    finally:
        ray.shutdown()
    optimizer_bytes = {"0": results["zero0"]["optimizer_state_bytes"], "1": results["zero1"]["optimizer_state_bytes"],
                       "2": results["korch2"]["optimizer_state_bytes"], "3": results["zero3"]["optimizer_state_bytes"]}
    return {
        "bench": "train",
        "torch_samples_per_s": round(torch_rate, 1),
        "korch1_samples_per_s": round(results["korch1"]["rate"], 1),
        "korch2_samples_per_s": round(results["korch2"]["rate"], 1),
        "ratio": round(results["korch1"]["rate"] / torch_rate, 3),
        "startup_s": {"korch1": round(results["korch1"]["startup_s"], 1), "korch2": round(results["korch2"]["startup_s"], 1)},
        "optimizer_bytes_per_worker": optimizer_bytes,
        "zero2_over_zero0": round(optimizer_bytes["2"] / max(1, optimizer_bytes["0"]), 3),
        "master_param_bytes_per_worker": {"0": results["zero0"]["master_param_bytes"], "1": results["zero1"]["master_param_bytes"],
                                          "2": results["korch2"]["master_param_bytes"], "3": results["zero3"]["master_param_bytes"]},
        "setup": {"model": "bert tiny", "micro_batch": micro, "seq_len": seq_len, "steps": steps, "warmup_steps": WARMUP_STEPS,
                  "statistic": f"median of {WINDOW}-step windows", "threads_per_worker": 1},
    }


def _cmd(args) -> int:
    from korch.config import _resolve_existing
    from korch.errors import UserError

    try:
        corpus = [_resolve_existing(path, "corpus") for path in (args.corpus or DEFAULT_CORPUS)]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(json.dumps(run_bench(corpus, steps=args.steps, micro=args.micro_batch_size)))
    return 0


def register(bench) -> None:
    p = bench.add_parser("train", help="korch (1 and 2 workers) vs a plain torch loop, and ZeRO 0-3 optimizer bytes")
    p.add_argument("--corpus", action="append", metavar="PATH", help="corpus to train on (default: ../shared/data/kowiki_sample)")
    p.add_argument("--steps", type=int, default=80, help=f"optimizer steps per run (the first {WARMUP_STEPS} are warm-up)")
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.set_defaults(func=_cmd)
