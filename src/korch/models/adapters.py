"""Bottleneck adapters (hidden -> r -> hidden, residual) on a frozen encoder, and their exact merge into it.

Each adapter sits after a transformer layer's feed-forward output projection (Houlsby's place, before that
layer's residual add and LayerNorm). It is affine (no activation): y + U(Dy + d) + u. That costs a little
expressiveness and buys an exact merge, W' = (I + UD) W, so `final/` can hold a plain HF encoder that gives
the adapted model's outputs with no adapter code at all. Stacked adapters (a language adapter under a task
adapter) compose in order and merge the same way. The up projection starts at zero, so a fresh adapter is the
identity and training starts exactly at the parent's model.
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, r: int):
        super().__init__()
        self.down = nn.Linear(hidden, r)
        self.up = nn.Linear(r, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(self.down(y))

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, c) with forward(y) == y @ M.T + c."""
        eye = torch.eye(self.up.out_features, dtype=self.up.weight.dtype, device=self.up.weight.device)
        return eye + self.up.weight @ self.down.weight, self.up.weight @ self.down.bias + self.up.bias


class AdaptedLinear(nn.Module):
    """A frozen Linear followed by its adapters, in order (index 0 is the lowest)."""

    def __init__(self, base: nn.Linear, sizes: list[int]):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleList(Bottleneck(base.out_features, r) for r in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for adapter in self.adapters:
            y = adapter(y)
        return y

    def merged(self) -> nn.Linear:
        weight, bias = self.base.weight.detach(), self.base.bias.detach()
        for adapter in self.adapters:
            m, c = (t.detach() for t in adapter.affine())
            weight, bias = m @ weight, m @ bias + c
        out = nn.Linear(self.base.in_features, self.base.out_features)
        with torch.no_grad():
            out.weight.copy_(weight)
            out.bias.copy_(bias)
        return out


def _ffn_outputs(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of each layer's feed-forward output projection (BERT and DeBERTa-v2 name it so)."""
    found = []
    for name, module in model.named_modules():
        if name.endswith(".output") and ".attention" not in name and isinstance(getattr(module, "dense", None),
                                                                                (nn.Linear, AdaptedLinear)):
            found.append((module, "dense"))
    if not found:
        raise ValueError(f"no transformer layer output projection found in {type(model).__name__}")
    return found


def add_adapters(model: nn.Module, sizes: list[int]) -> nn.Module:
    """Freeze every weight of `model` and put adapters of bottleneck sizes `sizes` (lowest first) in each layer."""
    for param in model.parameters():
        param.requires_grad_(False)
    for parent, attribute in _ffn_outputs(model):
        setattr(parent, attribute, AdaptedLinear(getattr(parent, attribute), sizes))
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """The same function as a plain module: each AdaptedLinear replaced by its merged Linear (in place)."""
    for parent, attribute in _ffn_outputs(model):
        layer = getattr(parent, attribute)
        if isinstance(layer, AdaptedLinear):
            setattr(parent, attribute, layer.merged())
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if ".adapters." in name}
