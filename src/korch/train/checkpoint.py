"""Consolidated, world-size-independent checkpoints in safetensors + JSON.

DeepSpeed's own checkpoints are per-rank pickles: they tie a run to its worker count (DeepSpeed#5405) and
loading them unpickles whatever sits in a run folder. korch instead gathers the full fp32 weights and the full
Adam moments of every parameter (DeepSpeed's `safe_get_full_*` API, which works for ZeRO 0-3) and writes:

    model.safetensors       full fp32 parameters, by name
    optimizer.safetensors   `<name>::exp_avg`, `<name>::exp_avg_sq`
    state.json              step, epoch, position in the epoch, Adam step, world size, ...

Restoring loads weights into the module before `deepspeed.initialize` and the moments after it, so a run saved
by 2 workers resumes on 1 or 6.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _inner_torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """DeepSpeed wraps the client optimizer (ZeRO, fp16 wrappers); walk down to the torch one that holds state."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer") and seen < 5:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


def _is_partitioned(param: torch.nn.Parameter) -> bool:
    # `_hp_mapping` exists on every rank under ZeRO-1/2 but is None where the rank holds no fragment of the
    # parameter; those ranks must still join the collective, so test for the attribute, not its value.
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def gather_full_state(model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Collective: every rank must call it in the same order. Returns full fp32 weights, Adam moments, Adam step."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    inner = _inner_torch_optimizer(optimizer)
    _relink_zero_fragments(optimizer)
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if _is_partitioned(param):
            weights[name] = safe_get_full_fp32_param(param).detach().float().cpu().clone()
            for key in _MOMENTS:
                value = safe_get_full_optimizer_state(param, key)
                if value is not None:
                    moments[f"{name}::{key}"] = value.detach().float().cpu().clone()
        else:
            weights[name] = param.detach().float().cpu().clone()
            state = inner.state.get(param, {})
            for key in _MOMENTS:
                if key in state:
                    moments[f"{name}::{key}"] = state[key].detach().float().cpu().clone()
    return weights, moments, _adam_step(inner)


def _adam_step(inner: torch.optim.Optimizer) -> int:
    for state in inner.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def load_weights_into(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Before `deepspeed.initialize`: copy saved weights into the plain module (tied weights are saved once)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    named = dict(model.named_parameters())
    absent = [key for key in missing if key in named]
    if absent or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {absent[:5]}, unexpected {unexpected[:5]}")


def restore_optimizer_state(model: torch.nn.Module, optimizer: Any, moments: dict[str, torch.Tensor], adam_step: int) -> None:
    """After `deepspeed.initialize`: put each parameter's full moments back, whatever the current partitioning."""
    from deepspeed.utils import safe_set_full_optimizer_state

    inner = _inner_torch_optimizer(optimizer)
    # torch Adam creates its state lazily at the first step; create it now so there is somewhere to write.
    # ZeRO keys the state by its flat fp32 partitions, which are not always in param_groups outside step().
    holders = [p for group in inner.param_groups for p in group["params"]]
    holders += list(getattr(optimizer, "fp32_partitioned_groups_flat", []) or [])
    holders += list(getattr(optimizer, "single_partition_of_fp32_groups", []) or [])
    for param in holders:
        state = inner.state[param]
        for key in _MOMENTS:
            state.setdefault(key, torch.zeros_like(param, memory_format=torch.preserve_format))
        state["step"] = torch.tensor(float(adam_step))
    _relink_zero_fragments(optimizer)
    for name, param in model.named_parameters():
        for key in _MOMENTS:
            value = moments.get(f"{name}::{key}")
            if value is None:
                continue
            if hasattr(param, "ds_id"):
                _set_zero3_state(optimizer, param, value, key)
            elif _is_partitioned(param):
                safe_set_full_optimizer_state(param, value.to(param.device), key)
            else:
                inner.state[param][key].copy_(value.view_as(param))


def _set_zero3_state(optimizer: Any, param: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    """ZeRO-3 pads each partition to equal size; DeepSpeed's `set_full_hp_param` overruns the last rank's slice
    when a parameter's size is not a multiple of the world size, so slice and copy here."""
    partition, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = partition.numel() * optimizer._get_param_partition_rank(param)
    chunk = value.flatten()[start:start + partition.numel()]
    partition.data.zero_()
    partition.data[: chunk.numel()].copy_(chunk.to(partition.device))


def _relink_zero_fragments(optimizer: Any) -> None:
    """Point each ZeRO-1/2 parameter's fragment at the current flat Adam state.

    DeepSpeed links them once, lazily, and the link can predate the state (it then stays empty); relinking
    before every gather/restore is cheap (views, no copies) and always right.
    """
    inner = _inner_torch_optimizer(optimizer)
    groups = getattr(optimizer, "bit16_groups", None)
    flat = getattr(optimizer, "single_partition_of_fp32_groups", None)
    if groups is None or flat is None:
        return
    for lp_params, flat_partition in zip(groups, flat):
        for lp in lp_params:
            if getattr(lp, "_hp_mapping", None) is not None:
                lp._hp_mapping.set_optim_state_fragment(flat_partition, inner.state[flat_partition])


def write_checkpoint(directory: str | os.PathLike, weights: dict, moments: dict, state: dict) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / MODEL_FILE))
    save_file({k: v.contiguous() for k, v in moments.items()}, str(directory / OPTIMIZER_FILE))
    # state.json last: a folder without it is a partial checkpoint and is never resumed from.
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1))


def is_checkpoint(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return all((directory / name).is_file() for name in (STATE_FILE, MODEL_FILE, OPTIMIZER_FILE))


def checkpoint_step(directory: str | os.PathLike) -> int:
    """The optimizer step a checkpoint was saved at (its state.json)."""
    return int(json.loads((Path(directory) / STATE_FILE).read_text()).get("step", 0))


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict, dict, dict]:
    from safetensors.torch import load_file

    directory = Path(directory)
    state = json.loads((directory / STATE_FILE).read_text())
    return load_file(str(directory / MODEL_FILE)), load_file(str(directory / OPTIMIZER_FILE)), state


def atomic_publish(build_into: Any, target: str | os.PathLike) -> None:
    """Build a folder next to `target`, then swap it in, so readers never see a half-written one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build_into(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
