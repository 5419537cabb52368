"""Config of korch's mean/max-pooled sequence classifier (`model_type: korch-pooling`).

This file is copied as-is into every saved classifier folder (with `modeling_korch_pooling.py`), so that
`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)` works where korch is not
installed. It must therefore import nothing from korch: transformers only.
"""

from transformers import PretrainedConfig

POOLINGS = ("mean", "max")


class KorchPoolingConfig(PretrainedConfig):
    """An encoder config (`encoder`, any Auto encoder: bert, deberta-v2, ...) plus a pooling and a linear head.

    `num_labels` / `id2label` / `label2id` are the usual Hugging Face classification fields.
    """

    model_type = "korch-pooling"
    _auto_class = "AutoConfig"  # save_pretrained ships this file and writes `auto_map`

    def __init__(self, encoder=None, pooling: str = "mean", classifier_dropout=None, **kwargs):
        # AutoConfig is imported here, not at the top: this module may be imported while transformers' Auto
        # configuration module is itself still being imported (korch registers the class from an import hook).
        from transformers import AutoConfig

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
        if encoder is None:
            encoder = AutoConfig.for_model("bert")
        elif isinstance(encoder, dict):
            encoder = dict(encoder)
            if "model_type" not in encoder:
                raise ValueError("encoder config dict needs a 'model_type' (e.g. 'bert' or 'deberta-v2')")
            encoder = AutoConfig.for_model(encoder.pop("model_type"), **encoder)
        elif not isinstance(encoder, PretrainedConfig):
            raise TypeError(f"encoder must be a config or a dict, got {type(encoder).__name__}")
        self.encoder = encoder
        self.pooling = pooling
        self.classifier_dropout = classifier_dropout
        super().__init__(**kwargs)
