"""Stochastic weight averaging (SWA) over the last K epoch ends (`train.swa_epochs`).

Every rank keeps a window of the full fp32 weights gathered at each epoch end (the same gather the
checkpoint takes, so it costs no extra collective). The average is an equal-weight mean of the snapshots in
the window, which is what `torch.optim.swa_utils.AveragedModel` computes with its default averaging when
it is updated once per epoch; encoders use LayerNorm, so there are no batch-norm statistics to recompute.
The window rides in korch checkpoints (`swa.safetensors` plus `swa_epochs` in state.json), so a run resumed
after a failure averages exactly the epochs an uninterrupted run would.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

SWA_FILE = "swa.safetensors"


def average_weights(snapshots: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Equal-weight mean of several state dicts with the same keys; summed in float64, returned in each dtype."""
    if not snapshots:
        raise ValueError("nothing to average")
    keys = list(snapshots[0])
    for snapshot in snapshots[1:]:
        if set(snapshot) != set(keys):  # order may differ: a window read back from safetensors is sorted by name
            raise ValueError("snapshots hold different parameters; they come from different models")
    averaged = {}
    for key in keys:
        first = snapshots[0][key]
        if not first.is_floating_point():
            averaged[key] = snapshots[-1][key].clone()  # integer buffers are not averaged
            continue
        total = torch.zeros_like(first, dtype=torch.float64)
        for snapshot in snapshots:
            total += snapshot[key].double()
        averaged[key] = (total / len(snapshots)).to(first.dtype)
    return averaged


class SwaWindow:
    """The last `size` epoch-end weight snapshots, labelled by epoch number (1-based)."""

    def __init__(self, size: int | None):
        self.size = size or 0
        self.snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []

    @property
    def enabled(self) -> bool:
        return self.size > 0

    @property
    def epochs(self) -> list[int]:
        return [epoch for epoch, _ in self.snapshots]

    def add(self, epoch: int, weights: Mapping[str, torch.Tensor]) -> None:
        if not self.enabled or epoch in self.epochs:  # a resumed run may reach the same epoch end again
            return
        self.snapshots.append((epoch, {name: value.detach().cpu().clone() for name, value in weights.items()}))
        del self.snapshots[:-self.size]

    def average(self) -> dict[str, torch.Tensor]:
        return average_weights([weights for _, weights in self.snapshots])

    def write(self, directory: str | os.PathLike) -> dict:
        """Save the window into a checkpoint folder; returns the state.json fields that name its epochs."""
        from safetensors.torch import save_file

        if self.snapshots:
            tensors = {f"{slot}::{name}": value.contiguous()
                       for slot, (_, weights) in enumerate(self.snapshots) for name, value in weights.items()}
            save_file(tensors, str(Path(directory) / SWA_FILE))
        return {"swa_epochs": self.epochs}

    @classmethod
    def read(cls, directory: str | os.PathLike | None, size: int | None, state: Mapping) -> "SwaWindow":
        """The window saved in a checkpoint; empty when the checkpoint has none (SWA off when it was written)."""
        window = cls(size)
        path = Path(directory) / SWA_FILE if directory else None
        epochs = list(state.get("swa_epochs") or [])
        if not window.enabled or path is None or not epochs or not path.is_file():
            return window
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        for slot, epoch in enumerate(epochs):
            prefix = f"{slot}::"
            window.add(int(epoch), {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)})
        return window


def load_full_weights(module: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Collective: put full weights into a live (DeepSpeed-wrapped) module's forward parameters, any ZeRO stage.

    Under ZeRO-3 the parameters are partitioned: gather them, let rank 0 write, and DeepSpeed re-partitions
    on exit. Under ZeRO 0-2 every rank holds the full parameters and writes its own copy.
    """
    params = dict(module.named_parameters())
    missing = [name for name in params if name not in weights]
    if missing:
        raise RuntimeError(f"averaged weights lack parameters {missing[:5]}")
    with torch.no_grad():
        if any(hasattr(p, "ds_id") for p in params.values()):
            import deepspeed
            import torch.distributed as dist

            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                if not dist.is_initialized() or dist.get_rank() == 0:
                    for name, param in params.items():
                        param.data.copy_(weights[name].to(param.device, param.dtype).view_as(param.data))
        else:
            for name, param in params.items():
                param.data.copy_(weights[name].to(param.device, param.dtype).view_as(param.data))
