"""The `adapter` task: bottleneck adapters on a frozen encoder, trained with the simcse objective.

`kind: bottleneck` puts one adapter (hidden -> r -> hidden, residual) in each layer; `kind: hierarchical` stacks
a language adapter (`language_r`) under a task adapter (`r`), both trained here. The base model is frozen and
only adapter parameters reach the optimizer (the loop hands it trainable parameters only; the summary's
`optimizer_state_bytes` shows it). `final/` holds `adapter.safetensors` (the adapter weights alone) and the
merged encoder (`korch.models.adapters`: exact for these affine adapters), which loads as a plain HF model and
in sentence-transformers with the stage's pooling.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from korch.tasks.simcse import SimcseOptions, SimcseTask


class AdapterOptions(SimcseOptions):
    kind: Literal["bottleneck", "hierarchical"] = "bottleneck"
    """`bottleneck`: one adapter per layer. `hierarchical`: a language adapter under a task adapter per layer."""
    r: int = Field(default=256, ge=1)
    """Bottleneck width of the (task) adapter: hidden -> r -> hidden."""
    language_r: int = Field(default=256, ge=1)
    """`hierarchical` only: bottleneck width of the language adapter under the task adapter."""

    @property
    def sizes(self) -> list[int]:
        return [self.language_r, self.r] if self.kind == "hierarchical" else [self.r]


class AdapterTask(SimcseTask):
    name = "adapter"
    Options = AdapterOptions

    def build_model(self, start_from):
        from korch.models.adapters import add_adapters

        return add_adapters(super().build_model(start_from), self.options.sizes)

    def empty_model(self, config):
        from korch.models.adapters import add_adapters

        return add_adapters(super().empty_model(config), self.options.sizes)

    def save(self, model, folder):
        import copy
        import os

        from safetensors.torch import save_file

        from korch.models.adapters import adapter_state, merge_adapters

        save_file(adapter_state(model), os.path.join(folder, "adapter.safetensors"),
                  metadata={"kind": self.options.kind, "sizes": ",".join(map(str, self.options.sizes))})
        super().save(merge_adapters(copy.deepcopy(model)), folder)
