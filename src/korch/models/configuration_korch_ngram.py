"""Config of korch's fastText-style bag-of-n-grams classifier (`model_type: korch-ngram`).

This file is copied as-is into every saved n-gram classifier folder (with `modeling_korch_ngram.py`), so that
`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)` works where korch is not
installed. It must therefore import nothing from korch: transformers only.
"""

from transformers import PretrainedConfig


class KorchNgramConfig(PretrainedConfig):
    """Token ids -> unigrams (their own rows) plus hashed 2..`ngram_max`-grams (`buckets` shared rows) -> the mean of
    their `hidden_size` embeddings over the real (unpadded) tokens -> dropout -> a linear head.

    `num_labels` / `id2label` / `label2id` are the usual Hugging Face classification fields.
    """

    model_type = "korch-ngram"
    _auto_class = "AutoConfig"  # save_pretrained ships this file and writes `auto_map`

    def __init__(self, vocab_size: int = 8000, hidden_size: int = 64, ngram_max: int = 3, buckets: int = 2 ** 18,
                 classifier_dropout=None, initializer_range: float = 0.02, pad_token_id: int = 0, **kwargs):
        if int(ngram_max) < 1:
            raise ValueError(f"ngram_max must be at least 1, got {ngram_max}")
        if int(ngram_max) > 1 and int(buckets) < 1:
            raise ValueError(f"buckets must be at least 1 when ngram_max > 1, got {buckets}")
        if int(vocab_size) < 1 or int(hidden_size) < 1:
            raise ValueError(f"vocab_size and hidden_size must be positive, got {vocab_size} and {hidden_size}")
        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.ngram_max = int(ngram_max)
        self.buckets = int(buckets) if int(ngram_max) > 1 else 0
        self.classifier_dropout = classifier_dropout
        self.initializer_range = initializer_range
        super().__init__(pad_token_id=pad_token_id, **kwargs)
