"""korch: one job spec in, distributed Korean-NLP training on Ray + DeepSpeed out."""

__version__ = "0.1.0"
