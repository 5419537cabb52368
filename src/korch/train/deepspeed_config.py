"""The DeepSpeed config as a pure function of the spec, so it can be checked as data without starting Ray."""

from __future__ import annotations

from typing import Any

from korch.config import DeepSpeedConfig, TrainConfig


def resolve_precision(deepspeed: DeepSpeedConfig, use_gpu: bool) -> str:
    if deepspeed.precision != "auto":
        return deepspeed.precision
    # bf16 halves activation memory on Ampere+ GPUs without fp16's loss scaling; CPU kernels stay in fp32.
    return "bf16" if use_gpu else "fp32"


def build_deepspeed_config(deepspeed: DeepSpeedConfig, train: TrainConfig, num_workers: int, use_gpu: bool) -> dict[str, Any]:
    precision = resolve_precision(deepspeed, use_gpu)
    zero: dict[str, Any] = {"stage": deepspeed.zero_stage}
    if deepspeed.zero_stage >= 2:
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True, reduce_scatter=True)
    if deepspeed.zero_stage == 3:
        # Export and consolidated checkpoints gather parameters explicitly, so the 16-bit shortcut isn't needed.
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    if deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * num_workers,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        # korch passes a torch AdamW so the same optimizer runs on CPU (no fused CUDA Adam) and GPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config
