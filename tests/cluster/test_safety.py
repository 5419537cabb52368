"""Nothing korch loads from a run folder is unpickled, and secrets stay out of output.

A run folder is data anyone with write access to shared storage can plant files in; a pickle there is code.
"""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "korch"


class _Boom:
    """Unpickling this creates the marker file: proof that someone ran code from the run folder."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickles(folder: Path, marker: Path) -> None:
    payload = pickle.dumps(_Boom(str(marker)))
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth", "scheduler.pt"):
        (folder / name).write_bytes(payload)


@pytest.fixture
def poisoned_run(tmp_path):
    """runs/job/mlm/final/: a real tiny HF model in safetensors, plus malicious pickles beside it."""
    from transformers import BertConfig, BertForMaskedLM

    final = tmp_path / "runs" / "job" / "mlm" / "final"
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertForMaskedLM(config).save_pretrained(final, safe_serialization=True)
    marker = tmp_path / "PWNED"
    _plant_pickles(final, marker)
    return final, marker


def test_the_payload_really_is_malicious(tmp_path):
    # Guard against a vacuous test: unpickling the planted file does create the marker.
    marker = tmp_path / "PWNED"
    _plant_pickles(tmp_path, marker)
    pickle.loads((tmp_path / "pytorch_model.bin").read_bytes())
    assert marker.exists()


def test_loading_a_model_never_unpickles(poisoned_run):
    from transformers import AutoModelForMaskedLM

    from korch.models import load_pretrained

    final, marker = poisoned_run
    model = load_pretrained(str(final), AutoModelForMaskedLM)
    assert model.config.hidden_size == 16
    assert not marker.exists()


def test_a_pickle_only_folder_is_refused_not_loaded(poisoned_run):
    from transformers import AutoModelForMaskedLM

    from korch.models import load_pretrained

    final, marker = poisoned_run
    (final / "model.safetensors").unlink()
    with pytest.raises(Exception):
        load_pretrained(str(final), AutoModelForMaskedLM)
    assert not marker.exists()


def test_resuming_a_checkpoint_never_unpickles(tmp_path):
    # A korch checkpoint (safetensors + JSON) next to DeepSpeed/HF-Trainer-style pickles that a careless
    # resume would torch.load.
    import torch

    from korch.train.checkpoint import read_checkpoint, write_checkpoint

    folder = tmp_path / "runs" / "job" / "mlm" / "ray" / "run" / "checkpoint_000001"
    write_checkpoint(folder, {"w": torch.ones(2)}, {"w::exp_avg": torch.zeros(2)}, {"step": 1, "adam_step": 1})
    marker = tmp_path / "PWNED"
    _plant_pickles(folder, marker)
    (folder / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(_Boom(str(marker))))
    weights, moments, state = read_checkpoint(folder)
    assert torch.equal(weights["w"], torch.ones(2)) and state["step"] == 1
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_torch_load_weights_only_refuses_the_payload(poisoned_run):
    # The one sanctioned way to read a .pt: weights_only=True does not run __reduce__.
    import torch

    final, marker = poisoned_run
    with pytest.raises(Exception):
        torch.load(final / "optimizer.pt", weights_only=True)
    assert not marker.exists()


# --- source scan -----------------------------------------------------------------------------------------

def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name


def unsafe_loads(source: str) -> list[str]:
    """Calls that unpickle: torch.load without weights_only=True, pickle/cloudpickle/dill/joblib loads,
    numpy load with allow_pickle=True, from_pretrained with use_safetensors=False."""
    problems = []
    for node, owner, name in _calls(ast.parse(source)):
        kwargs = {k.arg: k.value for k in node.keywords}

        def is_true(key):
            value = kwargs.get(key)
            return isinstance(value, ast.Constant) and value.value is True

        def is_false(key):
            value = kwargs.get(key)
            return isinstance(value, ast.Constant) and value.value is False

        where = f"line {node.lineno}"
        if owner == "torch" and name == "load" and not is_true("weights_only"):
            problems.append(f"{where}: torch.load without weights_only=True")
        elif owner in ("pickle", "cloudpickle", "dill", "joblib", "_pickle") and name in ("load", "loads"):
            problems.append(f"{where}: {owner}.{name}")
        elif owner in ("np", "numpy") and name == "load" and is_true("allow_pickle"):
            problems.append(f"{where}: numpy.load(allow_pickle=True)")
        elif name == "from_pretrained" and is_false("use_safetensors"):
            problems.append(f"{where}: from_pretrained(use_safetensors=False)")
    return problems


def test_scanner_flags_what_it_should():
    bad = ("import torch, pickle\ntorch.load(p)\ntorch.load(p, weights_only=False)\npickle.load(f)\n"
           "M.from_pretrained(p, use_safetensors=False)\n")
    assert len(unsafe_loads(bad)) == 4
    assert unsafe_loads("import torch\ntorch.load(p, weights_only=True, map_location='cpu')\n") == []


def test_no_korch_source_unpickles():
    problems = {}
    for path in sorted(SRC.rglob("*.py")):
        found = unsafe_loads(path.read_text(encoding="utf-8"))
        if found:
            problems[str(path.relative_to(REPO))] = found
    assert problems == {}


def test_from_pretrained_calls_in_korch_use_safetensors():
    # Every from_pretrained that reads a model (not a tokenizer or config) says use_safetensors=True, so a
    # folder holding only a pickle fails instead of being unpickled.
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node, owner, name in _calls(ast.parse(path.read_text(encoding="utf-8"))):
            if name != "from_pretrained" or "Tokenizer" in owner or "Config" in owner:
                continue
            kwargs = {k.arg: k.value for k in node.keywords}
            value = kwargs.get("use_safetensors")
            if not (isinstance(value, ast.Constant) and value.value is True):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {owner}.from_pretrained")
    assert offenders == []


# --- secrets ---------------------------------------------------------------------------------------------

def test_env_var_token_is_used_and_not_logged(monkeypatch, capsys):
    from korch.cluster.submit import auth_headers, read_auth_token, redact

    token = "s3cr3t-" + os.urandom(8).hex()
    assert read_auth_token({"RAY_AUTH_TOKEN": token, "HOME": "/nonexistent"}) == token
    assert auth_headers(token) == {"Authorization": f"Bearer {token}"}
    assert token not in redact(f"failed with headers {{'Authorization': 'Bearer {token}'}}", [token])
    out = capsys.readouterr()
    assert token not in out.out + out.err
