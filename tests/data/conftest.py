"""Fixtures for korch.data tests: a tiny WordPiece tokenizer, the fixture corpus, one session Ray."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
CORPUS = FIXTURES / "corpus"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    return CORPUS


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """A ~2000-piece WordPiece tokenizer trained on the fixture corpus (nothing is downloaded)."""
    from korch.config import DataConfig
    from korch.data.readers import iter_documents
    from korch.data.tokenizer import train_wordpiece

    cfg = DataConfig(inputs=[str(CORPUS)], min_doc_chars=0)
    out = tmp_path_factory.mktemp("tokenizer")
    return train_wordpiece(list(iter_documents(cfg.inputs, cfg)), str(out), vocab_size=2000, min_frequency=1)


@pytest.fixture
def corpus_copy(tmp_path) -> Path:
    """A writable copy of the fixture corpus, to add bad files to."""
    dst = tmp_path / "corpus"
    shutil.copytree(CORPUS, dst)
    return dst


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray for the whole session; reused if a test run already started one."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    # address="local": never join another agent's `ray start` cluster on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False, object_store_memory=200 * 2**20)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _data_config(**kwargs):
    from korch.config import DataConfig

    kwargs.setdefault("min_doc_chars", 0)
    kwargs.setdefault("preprocess_actors", 2)
    kwargs.setdefault("actor_cpus", 0.5)
    return DataConfig(**kwargs)


@pytest.fixture(scope="session")
def make_cfg():
    """Build a DataConfig for tests: 2 actors at 0.5 CPU and no minimum length unless asked."""
    return _data_config
