"""korch's fastText-style bag-of-n-grams sequence classifier (`model_type: korch-ngram`).

Each real token contributes its unigram (row `id` of the table) and every 2..`ngram_max`-gram of consecutive real
tokens starting at it (row `vocab_size + hash(n-gram) % buckets`). The hash is fixed integer arithmetic on the ids
(no Python `hash()`, no randomness), so a saved folder predicts the same anywhere. An n-gram touching a padded
position never counts, and the average divides by the number of real n-grams, so padding changes nothing.

Plain `nn.Embedding` + `nn.Linear`, called as modules: DeepSpeed ZeRO 0-3 and safetensors need nothing special.
Like `configuration_korch_ngram.py`, this file is copied into every saved folder so that `trust_remote_code=True`
loads it without korch: it imports nothing from korch.
"""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .configuration_korch_ngram import KorchNgramConfig

# Rolling hash h = (h * _MULT + id + 1) mod 2^31 over the n-gram's ids, then a xor-shift-multiply finaliser so
# that every bit of every id reaches the low bits a `% buckets` keeps. h < 2^31 and both multipliers < 2^27 keep
# every product inside int64, so the result is the same on every device and in every process.
_MULT = 116049371
_MIX = 0x45D9F3B
_MOD = 2 ** 31
_SEED = 1000003


def _finalise(h: torch.Tensor) -> torch.Tensor:
    h = ((h ^ (h >> 16)) * _MIX) % _MOD
    return h ^ (h >> 16)


def ngram_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int, ngram_max: int,
               buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, weights), both (B, T * ngram_max): the table row of every n-gram starting at every position, and 1.0
    where all of the n-gram's tokens are real, else 0.0. Unigrams use their own id; longer n-grams are hashed."""
    ids = input_ids.long()
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    length = ids.shape[1]
    rows, keep = [ids], [real]
    h = ids + (_SEED + 1)
    ok = real
    for n in range(2, ngram_max + 1):
        # shift left by one: position t now sees token t + n - 1; positions past the end are not real
        nxt = torch.zeros_like(ids)
        nxt_real = torch.zeros_like(real)
        if length > n - 1:
            nxt[:, : length - n + 1] = ids[:, n - 1:]
            nxt_real[:, : length - n + 1] = real[:, n - 1:]
        h = (h * _MULT + nxt + 1) % _MOD
        ok = ok & nxt_real
        rows.append(vocab_size + _finalise(h) % buckets)
        keep.append(ok)
    rows = torch.cat(rows, dim=1)
    keep = torch.cat(keep, dim=1)
    return rows.masked_fill(~keep, 0), keep


class KorchNgramPreTrainedModel(PreTrainedModel):
    config_class = KorchNgramConfig
    base_model_prefix = "ngram"
    supports_gradient_checkpointing = False
    main_input_name = "input_ids"

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)


class KorchNgramForSequenceClassification(KorchNgramPreTrainedModel):
    _auto_class = "AutoModelForSequenceClassification"  # save_pretrained ships this file and writes `auto_map`

    def __init__(self, config: KorchNgramConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.embeddings = nn.Embedding(config.vocab_size + config.buckets, config.hidden_size)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(0.0 if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def bag(self, input_ids, attention_mask=None):
        """The mean n-gram embedding of each row, (B, hidden_size); a row with no real token is all zeros."""
        config = self.config
        rows, keep = ngram_rows(input_ids, attention_mask, config.vocab_size, config.ngram_max, config.buckets)
        vectors = self.embeddings(rows)  # called as a module: ZeRO-3 gathers the table for it
        weights = keep.to(vectors.dtype).unsqueeze(-1)
        return (vectors * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, return_dict=None,
                **kwargs):
        # token_type_ids (segments of a text pair) are accepted for the tokenizer's sake; a bag does not use them.
        if input_ids is None:
            raise ValueError("KorchNgramForSequenceClassification needs input_ids (it has no inputs_embeds path)")
        logits = self.classifier(self.dropout(self.bag(input_ids, attention_mask)))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return SequenceClassifierOutput(loss=loss, logits=logits)
