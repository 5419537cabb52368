"""`korch bench gpu`: the model builders' training step on one GPU, at the long-sequence jobs' shapes.

For each job named (default: the coref MLM jobs at 1536 and 2048 tokens) it builds the first stage's model the
way a korch worker does (`build_mlm_model` on the stage's `model:` section, the tokenizer's vocab size and the
data's `seq_len`), then times forward + backward + an AdamW step on random tokens at the stage's micro batch,
with gradient checkpointing as the job sets it and also flipped, so the memory/compute trade is measured side by
side. bf16 is run the way DeepSpeed's `precision: bf16` runs it: weights, activations and gradients in bf16.

Printed: one JSON line with tokens/s, model FLOP utilisation (MFU: the model's own FLOPs, recomputation not
counted, over the chip's dense bf16 peak and over a bf16 matmul measured in the same run) and peak memory.
Only torch and transformers are needed (no Ray, no DeepSpeed), so it runs on a bare GPU box.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

DEFAULT_JOBS = ["jobs/coref_mlm_1536.yaml", "jobs/coref_mlm_2048.yaml"]
# Dense bf16 tensor-core peak by the datasheet, per device name; MFU is also given against the measured matmul.
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.05, "A10G": 125.0}


def train_flops_per_token(config: Any, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward = 3x forward), counting matmuls only.

    Linear layers: 2 FLOPs per weight per token (4h^2 + 2hI per layer, the MLM head's transform h^2 and its
    decoder hV). Attention: QK^T and AV, 4*seq*h per token per layer. DeBERTa's disentangled attention adds
    content-to-position and position-to-content scores against 2*span relative positions: 8*span*h per token
    per layer. Gradient-checkpointing's recomputation is deliberately not counted (MFU, not hardware FLOPs).
    """
    h, layers, inter, vocab = (config.hidden_size, config.num_hidden_layers, config.intermediate_size,
                               config.vocab_size)
    per_layer = 2 * (4 * h * h + 2 * h * inter) + 4 * seq_len * h
    if getattr(config, "model_type", "") == "deberta-v2" and getattr(config, "relative_attention", False):
        pos_att = getattr(config, "pos_att_type", None) or []
        span = config.position_buckets if getattr(config, "position_buckets", -1) > 0 else config.max_relative_positions
        if span < 1:
            span = config.max_position_embeddings
        span = min(span, seq_len)
        per_layer += 4 * span * h * sum(kind in pos_att for kind in ("c2p", "p2c"))
    head = 2 * (h * h + h * vocab)
    return 3.0 * (layers * per_layer + head)


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float) -> float:
    """Fraction of `peak_tflops` that `tokens_per_s` tokens of `flops_per_token` each amount to."""
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def _job_shape(path: str) -> dict:
    """The first trained stage's model section, vocab size, seq_len, micro batch and precision, from the YAML
    alone: the data paths need not exist on the GPU box, so the whole job is not validated here."""
    from pydantic import ValidationError

    from korch.config import ModelConfig, read_yaml_mapping
    from korch.errors import UserError

    spec = read_yaml_mapping(path, "name one of jobs/*.yaml", "`name` and `stages`")
    stage = next((s for s in spec.get("stages") or [] if isinstance(s, dict) and "model" in s), None)
    if stage is None:
        raise UserError(f"{path}: no stage with a `model:` section to benchmark")
    try:
        model = ModelConfig.model_validate(stage["model"])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{path}: stages.{stage.get('name')}.model.{where}: {first['msg']}") from None
    ds = (stage.get("distributed") or {}).get("deepspeed") or {}
    return {"job": path, "stage": stage.get("name"), "model": model,
            "vocab_size": int((stage.get("tokenizer") or {}).get("vocab_size", 8000)),
            "seq_len": int((stage.get("data") or {}).get("seq_len", 128)),
            "micro_batch_size": int((stage.get("train") or {}).get("micro_batch_size", 8)),
            "precision": ds.get("precision", "bf16")}


def _measure_matmul_tflops(torch, device: str, n: int = 8192, reps: int = 10) -> float | None:
    if device != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def time_training_step(shape: dict, *, checkpointing: bool, device: str, warmup: int, steps: int,
                       micro_batch_size: int | None = None) -> dict:
    """Build the stage's model and time `steps` optimizer steps after `warmup`; one dict of figures."""
    import torch

    from korch.models import build_mlm_model

    model_cfg = shape["model"].model_copy(update={"gradient_checkpointing": checkpointing})
    batch = micro_batch_size or shape["micro_batch_size"]
    seq = shape["seq_len"]
    torch.manual_seed(0)
    net = build_mlm_model(model_cfg, shape["vocab_size"], seq)
    dtype = torch.bfloat16 if shape["precision"] == "bf16" else torch.float32
    net = net.to(device=device, dtype=dtype).train()
    params = sum(p.numel() for p in net.parameters())
    flops = train_flops_per_token(net.config, seq)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, foreach=True)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(5, shape["vocab_size"], (batch, seq), generator=gen).to(device)
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(batch, seq, generator=gen).to(device) < 0.15  # an MLM's share of scored tokens
    labels[chosen] = ids[chosen]
    mask = torch.ones_like(ids)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def step():
        loss = net(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    try:
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            loss = step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        del net, opt
        return {"checkpointing": checkpointing, "micro_batch_size": batch, "error": "out of memory"}
    step_s = statistics.median(times)
    result = {"checkpointing": checkpointing, "micro_batch_size": batch, "params_m": round(params / 1e6, 1),
              "step_s": round(step_s, 4), "tokens_per_s": round(batch * seq / step_s, 1),
              "model_tflops": round(batch * seq * flops / step_s / 1e12, 1), "loss": round(float(loss.detach()), 3)}
    if cuda:
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    del net, opt
    return result


def run_bench(jobs: list[str], *, device: str | None = None, warmup: int = 3, steps: int = 10,
              batches: list[int] | None = None) -> dict:
    import torch

    if device != "cpu" and not torch.cuda.is_available():
        from korch.errors import UserError

        # A base model at 1536 tokens takes minutes a step on a CPU: never fall back to it unasked.
        raise UserError(f"{'--device cuda' if device else 'korch bench gpu'}: no CUDA device here (torch "
                        f"{torch.__version__}); run it on a GPU machine, or give --device cpu to time the CPU")
    device = device or "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    matmul = _measure_matmul_tflops(torch, device)
    report: dict[str, Any] = {"bench": "gpu", "device": name, "torch": torch.__version__,
                              "datasheet_bf16_tflops": peak,
                              "matmul_bf16_tflops": round(matmul, 1) if matmul else None, "runs": []}
    import transformers

    report["transformers"] = transformers.__version__
    for path in jobs:
        shape = _job_shape(path)
        for checkpointing in (shape["model"].gradient_checkpointing, not shape["model"].gradient_checkpointing):
            for batch in batches or [shape["micro_batch_size"]]:
                got = time_training_step(shape, checkpointing=checkpointing, device=device, warmup=warmup,
                                         steps=steps, micro_batch_size=batch)
                row = {"job": path, "arch": shape["model"].arch, "size": shape["model"].size,
                       "seq_len": shape["seq_len"], "vocab_size": shape["vocab_size"],
                       "precision": shape["precision"], **got}
                if "model_tflops" in got:
                    row["mfu_datasheet"] = round(got["model_tflops"] / peak, 4) if peak else None
                    row["mfu_matmul"] = round(got["model_tflops"] / matmul, 4) if matmul else None
                report["runs"].append(row)
                print(f"[korch] bench gpu: {json.dumps(row)}", flush=True)
    return report


def _cmd(args) -> int:
    report = run_bench(args.job or DEFAULT_JOBS, device=args.device, warmup=args.warmup, steps=args.steps,
                       batches=args.micro_batch_size)
    print(json.dumps(report))
    return 0


def register(bench) -> None:
    p = bench.add_parser("gpu", help="a job's model on one GPU: tokens/s, MFU and peak memory of a training step")
    p.add_argument("--job", action="append", metavar="JOB.yaml",
                   help=f"job whose first model stage is measured (repeatable; default: {' '.join(DEFAULT_JOBS)})")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"],
                   help="default cuda; without one, give cpu to time the CPU (slow)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--micro-batch-size", type=int, action="append",
                   help="micro batch(es) to time instead of the job's own (repeatable)")
    p.set_defaults(func=_cmd)
