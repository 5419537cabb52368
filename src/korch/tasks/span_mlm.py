"""The `span_mlm` task: SpanBERT span masking on packed corpus blocks, with the span-boundary objective optional.

    korch run jobs/spanbert_pretrain.yaml

Spans are runs of whole words (`korch.tasks.masking`; a word is an eojeol or, with `data.morphemes: true`, a
Kiwi morpheme) whose length in words is Geometric(0.2) clipped to 10 (mean 3.8), until 15% of the tokens are
masked; each span is replaced as a unit (80% [MASK], 10% random, 10% kept). With `boundary_objective`, a
two-layer head also predicts every masked token from the two tokens just outside its span plus a position
embedding of its offset in the span (SpanBERT's SBO); its loss is added to the MLM loss. The export is the
plain masked-LM folder (what fine-tuning loads); the SBO head goes beside it in `sbo_head.safetensors`, so a
later span_mlm stage continues with it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pydantic import Field

from korch.spec import Section
from korch.tasks.mlm import MlmTask

if TYPE_CHECKING:
    import torch

SBO_FILE = "sbo_head.safetensors"
SBO_KEYS = ("sbo_left", "sbo_right", "sbo_offset")


class SpanMlmOptions(Section):
    mask_probability: float = Field(default=0.15, gt=0.0, lt=1.0)
    """Masking budget: share of each block's tokens covered by spans."""
    boundary_objective: bool = False
    """Add SpanBERT's span-boundary objective (SBO): predict each span token from the span's boundary tokens."""
    max_span_offset: int = Field(default=64, ge=1)
    """Positions of the SBO offset embedding; offsets past it share the last one (spans are up to 10 words)."""


def build_sbo_modules(hidden: int, max_offset: int):
    """The SBO head's layers: offset embedding and a 2-layer GeLU MLP with LayerNorm (the paper's f)."""
    import torch

    return torch.nn.ModuleDict({
        "offset": torch.nn.Embedding(max_offset, hidden),
        "mlp": torch.nn.Sequential(torch.nn.Linear(3 * hidden, hidden), torch.nn.GELU(), torch.nn.LayerNorm(hidden),
                                   torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.LayerNorm(hidden)),
    })


def _span_model_class():
    import torch

    class SpanBertForPreTraining(torch.nn.Module):
        """A masked-LM model plus the SBO head, which reuses the model's output projection to the vocabulary."""

        def __init__(self, mlm: torch.nn.Module, max_offset: int):
            super().__init__()
            self.mlm = mlm
            self.sbo = build_sbo_modules(mlm.config.hidden_size, max_offset)

        @property
        def config(self):
            return self.mlm.config

        def tie_weights(self):
            self.mlm.tie_weights()

        def forward(self, input_ids, attention_mask, labels=None, sbo_left=None, sbo_right=None, sbo_offset=None):
            out = self.mlm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True)
            if labels is None or sbo_left is None:
                return out
            chosen = labels != -100
            if not chosen.any():
                return out
            hidden = out.hidden_states[-1]
            rows = chosen.nonzero(as_tuple=True)[0]
            left = hidden[rows, sbo_left[chosen]]
            right = hidden[rows, sbo_right[chosen]]
            offset = self.sbo["offset"](sbo_offset[chosen].clamp(max=self.sbo["offset"].num_embeddings - 1))
            logits = self.mlm.get_output_embeddings()(self.sbo["mlp"](torch.cat([left, right, offset], dim=-1)))
            out.sbo_loss = torch.nn.functional.cross_entropy(logits.float(), labels[chosen])
            out.loss = out.loss + out.sbo_loss
            return out

    return SpanBertForPreTraining


class SpanMlmTask(MlmTask):
    name = "span_mlm"
    Options = SpanMlmOptions
    columns = ("input_ids", "word_starts")

    @classmethod
    def data_info(cls, manifest, options):
        return {}

    def _wrap(self, net):
        if not self.options.boundary_objective:
            return net
        return _span_model_class()(net, self.options.max_span_offset)

    def build_model(self, start_from):
        net = self._wrap(super().build_model(start_from))
        source = start_from or self.model_config.pretrained
        if self.options.boundary_objective and source and os.path.isfile(os.path.join(source, SBO_FILE)):
            from safetensors.torch import load_file

            net.sbo.load_state_dict(load_file(os.path.join(source, SBO_FILE)))
        return net

    def collate(self, rows, generator):
        from korch.tasks.masking import mask_spans
        from korch.tasks.mlm import pad_blocks

        input_ids, attention_mask = pad_blocks(rows["input_ids"], self.seq_len, self.tokenizer.pad_token_id)
        lengths = [min(len(ids), self.seq_len) for ids in rows["input_ids"]]
        inputs, labels, boundary = mask_spans(input_ids, lengths, rows["word_starts"], self.tokenizer.mask_token_id,
                                              len(self.tokenizer), self.options.mask_probability, generator)
        batch = {"input_ids": inputs, "attention_mask": attention_mask, "labels": labels}
        if self.options.boundary_objective:
            batch.update(boundary)
        return batch

    def eval_sums(self, model, batch, weight):
        return super().eval_sums(model, {k: v for k, v in batch.items() if k not in SBO_KEYS}, weight)

    def empty_model(self, config):
        return self._wrap(super().empty_model(config))

    def save(self, model, folder):
        if not self.options.boundary_objective:
            return super().save(model, folder)
        from safetensors.torch import save_file

        super().save(model.mlm, folder)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.sbo.state_dict().items()},
                  os.path.join(folder, SBO_FILE))

