"""DeepSpeed config, Ray ScalingConfig, step planning and masking, tested as data (no Ray started)."""

from __future__ import annotations

import pytest
import torch

from korch.config import DeepSpeedConfig, DistributedConfig, TrainConfig
from korch.tasks.mlm import mask_tokens, masking_generator, pad_blocks
from korch.train.deepspeed_config import build_deepspeed_config, resolve_precision
from korch.train.loop import lr_factor, plan_steps
from korch.train.scaling import build_scaling_config, build_torch_config, resolve_backend, worker_resources


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_per_zero_stage(stage):
    train = TrainConfig(max_steps=10, micro_batch_size=4, grad_accum=3, max_grad_norm=0.5)
    config = build_deepspeed_config(DeepSpeedConfig(zero_stage=stage), train, num_workers=2, use_gpu=False)
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_batch_size"] == 4 * 3 * 2
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.5
    assert "bf16" not in config and "fp16" not in config  # fp32 on CPU


def test_gpu_defaults_to_bf16_and_offload_maps_to_cpu():
    ds = DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_params=True)
    config = build_deepspeed_config(ds, TrainConfig(max_steps=1), num_workers=6, use_gpu=True)
    assert config["bf16"] == {"enabled": True}
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert resolve_precision(DeepSpeedConfig(precision="fp16"), True) == "fp16"
    fp16 = build_deepspeed_config(DeepSpeedConfig(precision="fp16"), TrainConfig(max_steps=1), 1, True)
    assert fp16["fp16"]["enabled"] and "bf16" not in fp16


def test_scaling_config_from_distributed():
    cpu = build_scaling_config(DistributedConfig(num_workers=2, cpus_per_worker=1.5))
    assert cpu.num_workers == 2 and not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 1.5}
    gpu = DistributedConfig(num_workers=6, use_gpu=True, cpus_per_worker=4, gpus_per_worker=1)
    assert worker_resources(gpu) == {"CPU": 4, "GPU": 1}
    assert build_scaling_config(gpu).use_gpu
    assert resolve_backend(gpu) == "nccl" and resolve_backend(DistributedConfig()) == "gloo"
    assert resolve_backend(gpu.model_copy(update={"backend": "gloo"})) == "gloo"
    assert build_torch_config(DistributedConfig()).backend == "gloo"


def test_plan_steps_epochs_and_max_steps():
    assert plan_steps(TrainConfig(epochs=2, micro_batch_size=4, grad_accum=2), rows_per_worker=100) == (12, 24)
    assert plan_steps(TrainConfig(epochs=5, max_steps=30, micro_batch_size=4), rows_per_worker=100) == (25, 30)
    assert plan_steps(TrainConfig(max_steps=7, micro_batch_size=4), rows_per_worker=100) == (25, 7)
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        plan_steps(TrainConfig(max_steps=7, micro_batch_size=64), rows_per_worker=10)


def test_lr_schedule_shapes():
    assert lr_factor(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "linear") == pytest.approx(0.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(80, 100, 0, "constant") == 1.0


def test_masking_is_deterministic_and_spares_special_and_padding():
    ids, attention = pad_blocks([[2, 10, 11, 12, 13, 3], [2, 20, 3]], seq_len=8, pad_id=0)
    assert ids.tolist()[1] == [2, 20, 3, 0, 0, 0, 0, 0] and attention.tolist()[1] == [1, 1, 1, 0, 0, 0, 0, 0]
    big_ids, big_attention = pad_blocks([[2] + list(range(10, 500)) + [3]] * 4, seq_len=512, pad_id=0)
    first = mask_tokens(big_ids, big_attention, [0, 1, 2, 3, 4], 4, 600, 0.15, masking_generator(1, 0, 5, 0))
    again = mask_tokens(big_ids, big_attention, [0, 1, 2, 3, 4], 4, 600, 0.15, masking_generator(1, 0, 5, 0))
    other = mask_tokens(big_ids, big_attention, [0, 1, 2, 3, 4], 4, 600, 0.15, masking_generator(1, 0, 5, 1))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])  # ranks mask differently
    masked, labels = first
    chosen = labels != -100
    assert 0.10 < chosen.float()[big_attention.bool()].mean() < 0.20
    assert not chosen[:, 0].any() and not chosen[big_attention == 0].any()
    assert (masked[chosen] == 4).float().mean() > 0.7


def test_cpu_workers_skip_deepspeeds_shm_comm_build(monkeypatch):
    """DeepSpeed's CPU comm would JIT-compile its shared-memory op (40 s on 2 cores) at start-up; korch's loop
    marks it incompatible first, so comm start-up finds nothing to build. The name must track DeepSpeed's."""
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    from korch.train.loop import SHM_COMM_OP, skip_shm_comm_build

    assert SHM_COMM_OP == ShareMemCommBuilder.NAME
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, SHM_COMM_OP, True)
    skip_shm_comm_build()
    assert build_shm_op() is None


def test_deepspeed_is_imported_without_mlflow_and_mlflow_still_imports_after():
    """DeepSpeed's autotuner imports MLflow at import time (1.4-2.6 s); the workers' import skips it. A fresh
    interpreter, since this one may have imported either already."""
    import subprocess
    import sys

    code = ("import sys; from korch.train.loop import import_deepspeed; import_deepspeed(); "
            "print('mlflow' in sys.modules); import mlflow; print('mlflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["False", "True"]
