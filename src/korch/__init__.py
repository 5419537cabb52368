"""korch: one job spec in, distributed Korean-NLP training on Ray + DeepSpeed out."""

__version__ = "0.1.0"

# After `import korch`, transformers' Auto classes (and so `pipeline`) load korch's mean/max-pooled and n-gram
# classifier folders. The hook registers only once transformers' Auto modules are imported, so `import korch` stays cheap.
try:
    from korch._hf_auto import install as _install_hf_auto

    _install_hf_auto()
except ImportError:  # transformers missing or too old: korch's classifier folders then need trust_remote_code
    pass
