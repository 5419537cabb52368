"""Teach transformers' Auto classes korch's own classifiers (`korch-pooling`, `korch-ngram`), without importing
transformers at `import korch`.

Registering eagerly would import torch and transformers (~5 s) on every `import korch`, the CLI's `--help`
included. Instead a post-import hook waits for transformers' Auto modules: once
`transformers.models.auto.configuration_auto` has run, `AutoConfig` learns `korch-pooling` and `korch-ngram`; once
`...modeling_auto` has run, `AutoModelForSequenceClassification` learns the models. So `import korch` followed by
`pipeline("text-classification", model=folder)` works, and costs nothing until transformers is used.

Standard library only: this module is imported by `korch/__init__.py`.
"""

from __future__ import annotations

import importlib.machinery
import sys

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODEL_AUTO = "transformers.models.auto.modeling_auto"
# korch's model types: (config module, config class, model module, model class).
_OURS = (
    ("korch.models.configuration_korch_pooling", "KorchPoolingConfig",
     "korch.models.modeling_korch_pooling", "KorchPoolingForSequenceClassification"),
    ("korch.models.configuration_korch_ngram", "KorchNgramConfig",
     "korch.models.modeling_korch_ngram", "KorchNgramForSequenceClassification"),
)
_CONFIGS_OURS = tuple(entry[0] for entry in _OURS)
_MODELS_OURS = tuple(entry[2] for entry in _OURS)
# korch's own modules are watched too: if a transformers module finishes while one of ours is half-imported (ours
# imported transformers), registering must wait until ours finishes.
_WATCHED = (_CONFIG_AUTO, _MODEL_AUTO) + _CONFIGS_OURS + _MODELS_OURS
_registered: set[str] = set()


def _loaded(name: str, just_done: str) -> bool:
    """True when `name` has finished importing (a module still executing has `__spec__._initializing` set)."""
    if name == just_done:
        return True
    module = sys.modules.get(name)
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


def _busy(name: str, just_done: str) -> bool:
    return name in sys.modules and not _loaded(name, just_done)


def _any_busy(names: tuple[str, ...], just_done: str) -> bool:
    return any(_busy(name, just_done) for name in names)


def _register(just_done: str = "") -> None:
    """Register whatever can be registered now; each half (all configs, all models) at most once."""
    import importlib

    if ("config" not in _registered and _loaded(_CONFIG_AUTO, just_done)
            and not _any_busy(_CONFIGS_OURS, just_done)):
        from transformers.models.auto.configuration_auto import AutoConfig

        for config_module, config_name, _, _ in _OURS:
            config_class = getattr(importlib.import_module(config_module), config_name)
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        _registered.add("config")
    if ("model" not in _registered and "config" in _registered and _loaded(_MODEL_AUTO, just_done)
            and not _any_busy(_MODELS_OURS, just_done) and not _any_busy(_CONFIGS_OURS, just_done)):
        from transformers.models.auto.modeling_auto import AutoModelForSequenceClassification

        for config_module, config_name, model_module, model_name in _OURS:
            config_class = getattr(importlib.import_module(config_module), config_name)
            model_class = getattr(importlib.import_module(model_module), model_name)
            AutoModelForSequenceClassification.register(config_class, model_class, exist_ok=True)
        _registered.add("model")


class _AfterImport:
    """A meta-path finder that finds nothing itself: for watched modules it wraps the real loader's `exec_module`."""

    def find_spec(self, name, path=None, target=None):
        if name not in _WATCHED or len(_registered) == 2:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                _register(name)
            except Exception as err:  # never break the user's import of transformers over an optional extra
                import warnings

                warnings.warn(f"korch could not register its classifiers with transformers: {err!r}",
                              stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec

    def invalidate_caches(self):
        pass


def install() -> None:
    """Install the hook once; if transformers' Auto modules are already imported, register right away."""
    if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
    if _CONFIG_AUTO in sys.modules or _MODEL_AUTO in sys.modules:
        _register()
