"""korch's mean/max-pooled sequence classifier: an Auto encoder, masked pooling, dropout, a linear head.

Hugging Face has `XForSequenceClassification` only for CLS-style pooling; this adds mean and max over the real
(unpadded) tokens. Like `configuration_korch_pooling.py`, this file is copied into every saved folder so that
`trust_remote_code=True` loads it without korch: it imports nothing from korch.
"""

import inspect

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .configuration_korch_pooling import KorchPoolingConfig


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence of `hidden` (B, T, H), counting only positions where `attention_mask` (B, T) is 1."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    # A row with no real token would divide by zero; its (all-masked) sum is 0, so it pools to 0.
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def masked_max(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Max over the sequence of `hidden` (B, T, H) among positions where `attention_mask` (B, T) is 1.

    Padded positions are replaced by the dtype's lowest value before the max (not multiplied by 0, which would let
    a padded 0 beat real negative activations), so padding never wins, however large its activations.
    """
    if attention_mask is None:
        return hidden.max(dim=1).values
    keep = attention_mask.bool().unsqueeze(-1)
    pooled = hidden.masked_fill(~keep, torch.finfo(hidden.dtype).min).max(dim=1).values
    # A row with no real token pools to 0 instead of the dtype's lowest value.
    return pooled.masked_fill(~keep.any(dim=1), 0.0)


_POOL = {"mean": masked_mean, "max": masked_max}


class KorchPoolingPreTrainedModel(PreTrainedModel):
    config_class = KorchPoolingConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True
    main_input_name = "input_ids"

    def _init_weights(self, module):
        # Only the head is ours; the encoder is a PreTrainedModel and initialises itself.
        if isinstance(module, nn.Linear):
            std = getattr(self.config.encoder, "initializer_range", 0.02)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class KorchPoolingForSequenceClassification(KorchPoolingPreTrainedModel):
    _auto_class = "AutoModelForSequenceClassification"  # save_pretrained ships this file and writes `auto_map`

    def __init__(self, config: KorchPoolingConfig):
        super().__init__(config)
        from transformers import AutoModel  # see configuration_korch_pooling: may run inside transformers' import

        self.num_labels = config.num_labels
        encoder_class = AutoModel._model_mapping[type(config.encoder)]
        # BERT-style encoders carry a CLS pooler (dense + tanh) that mean/max pooling never uses: leave it out, so
        # no parameter goes without a gradient (DDP) and the saved folder holds no dead weights.
        has_pooler_flag = "add_pooling_layer" in inspect.signature(encoder_class).parameters
        extra = {"add_pooling_layer": False} if has_pooler_flag else {}
        self.encoder = AutoModel.from_config(config.encoder, **extra)
        dropout = config.classifier_dropout
        if dropout is None:
            dropout = getattr(config.encoder, "hidden_dropout_prob", 0.1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.encoder.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.encoder.set_input_embeddings(value)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, inputs_embeds=None,
                return_dict=None, **kwargs):
        encoder_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds}
        if token_type_ids is not None:
            encoder_inputs["token_type_ids"] = token_type_ids
        outputs = self.encoder(**encoder_inputs, return_dict=True, **kwargs)
        pooled = _POOL[self.config.pooling](outputs.last_hidden_state, attention_mask)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
        if return_dict is False:
            return tuple(v for v in (loss, logits, outputs.hidden_states, outputs.attentions) if v is not None)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)
