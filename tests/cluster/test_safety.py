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


MARKER_NAME = "PWNED"
# Names HF Trainer, DeepSpeed and torch resumes read: beside korch's files, where a careless loader looks.
PICKLE_NAMES = ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "optimizer.bin", "model.pt",
                "rng_state.pth", "scheduler.pt", "mp_rank_00_model_states.pt",
                "zero_pp_rank_0_mp_rank_00_optim_states.pt", "state.pkl")


class _Boom:
    """Unpickling this creates the marker file: proof that someone ran code from the run folder."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickles(folder: Path, marker: Path) -> None:
    payload = pickle.dumps(_Boom(str(marker)))
    for name in PICKLE_NAMES:
        (folder / name).write_bytes(payload)


class UnpicklingForbidden(Exception):
    pass


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every unpickling entry point raises UnpicklingForbidden (and is recorded) while the test runs in-process.

    Patched where the callers look them up: torch.load (also torch.serialization.load), pickle.load/loads/
    Unpickler, cloudpickle.load/loads (standalone and Ray's vendored copy)."""
    import importlib

    import torch

    calls: list[tuple[str, str]] = []

    def refuse(what):
        def refused(*args, **kwargs):
            calls.append((what, repr(args[:1])[:200]))
            raise UnpicklingForbidden(what)

        return refused

    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(torch.serialization, "load", refuse("torch.serialization.load"))
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse(f"pickle.{name}"))
    for module_name in ("cloudpickle", "ray.cloudpickle"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in ("load", "loads"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse(f"{module_name}.{name}"))
    return calls


@pytest.fixture
def poisoned_run(tmp_path):
    """runs/job/mlm/final/: a real tiny HF model in safetensors, plus malicious pickles beside it."""
    from transformers import BertConfig, BertForMaskedLM

    final = tmp_path / "runs" / "job" / "mlm" / "final"
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertForMaskedLM(config).save_pretrained(final, safe_serialization=True)
    marker = tmp_path / MARKER_NAME
    _plant_pickles(final, marker)
    return final, marker


def test_the_payload_really_is_malicious(tmp_path):
    # Guard against a vacuous test: unpickling the planted file does create the marker.
    marker = tmp_path / MARKER_NAME
    _plant_pickles(tmp_path, marker)
    pickle.loads((tmp_path / "pytorch_model.bin").read_bytes())
    assert marker.exists()


def test_the_guard_catches_a_loader_that_unpickles(poisoned_run, no_unpickling):
    # Guard against a vacuous fixture: transformers without use_safetensors=True does torch.load the .bin.
    from transformers import AutoModelForMaskedLM

    final, marker = poisoned_run
    (final / "model.safetensors").unlink()
    with pytest.raises(Exception):
        AutoModelForMaskedLM.from_pretrained(final)
    assert [what for what, _ in no_unpickling][:1] == ["torch.load"]


# Every korch entry point that loads a model folder from a run folder. `korch predict` (not written yet) adds
# itself here, e.g. ("korch predict", lambda folder: main(["predict", str(folder), "--text", "..."])), and is
# then held to the same tests as the others.
def _load_pretrained(folder: Path):
    from transformers import AutoModelForMaskedLM

    from korch.models import load_pretrained

    return load_pretrained(str(folder), AutoModelForMaskedLM)


def _build_from_previous_stage(folder: Path):
    # What a training worker does with `needs:` or an HF `--from-checkpoint` folder (start_from).
    from korch.config import ModelConfig
    from korch.models import build_mlm_model

    return build_mlm_model(ModelConfig(), vocab_size=50, seq_len=32, start_from=str(folder))


MODEL_FOLDER_LOADERS = {"load_pretrained": _load_pretrained, "build_mlm_model(start_from)": _build_from_previous_stage}


@pytest.mark.parametrize("loader", sorted(MODEL_FOLDER_LOADERS))
def test_loading_a_model_never_unpickles(poisoned_run, no_unpickling, loader):
    final, marker = poisoned_run
    model = MODEL_FOLDER_LOADERS[loader](final)
    assert model.config.hidden_size == 16
    assert no_unpickling == [] and not marker.exists()


@pytest.mark.parametrize("loader", sorted(MODEL_FOLDER_LOADERS))
def test_a_pickle_only_folder_is_refused_not_loaded(poisoned_run, no_unpickling, loader):
    # Without model.safetensors the load must fail on the missing safetensors file, before anything opens
    # pytorch_model.bin; a loader that fell back to the pickle would hit UnpicklingForbidden instead.
    final, marker = poisoned_run
    (final / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        MODEL_FOLDER_LOADERS[loader](final)
    assert no_unpickling == [] and not marker.exists()


def test_resuming_a_checkpoint_never_unpickles(tmp_path, no_unpickling):
    # A korch checkpoint (safetensors + JSON) next to DeepSpeed/HF-Trainer-style pickles that a careless
    # resume would torch.load; the driver-side choices (--from-checkpoint, newest checkpoint, start step) and
    # the worker-side read all stay away from them.
    import torch

    from korch.train.checkpoint import is_checkpoint, read_checkpoint, write_checkpoint
    from korch.train.job import _resume_step
    from korch.train.runner import StageContext, apply_from_checkpoint, latest_checkpoint

    stage = tmp_path / "runs" / "job" / "mlm"
    folder = stage / "ray" / "train" / "checkpoint_000001"
    write_checkpoint(folder, {"w": torch.ones(2)}, {"w::exp_avg": torch.zeros(2)}, {"step": 1, "adam_step": 1})
    marker = tmp_path / MARKER_NAME
    _plant_pickles(folder, marker)
    (stage / "run.json").write_text('{"ray_run_name": "train"}')
    assert is_checkpoint(folder) and latest_checkpoint(stage) == folder
    ctx = StageContext(stage_dir=tmp_path / "other")
    apply_from_checkpoint(ctx, str(stage))
    assert ctx.resume_from == str(folder.resolve())
    assert _resume_step(StageContext(stage_dir=stage)) == 1
    weights, moments, state = read_checkpoint(folder)
    assert torch.equal(weights["w"], torch.ones(2)) and state["step"] == 1
    assert no_unpickling == [] and not marker.exists()


def test_a_checkpoint_with_only_pickles_is_not_a_checkpoint(tmp_path, no_unpickling):
    from korch.errors import UserError
    from korch.train.runner import StageContext, apply_from_checkpoint

    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    marker = tmp_path / MARKER_NAME
    _plant_pickles(folder, marker)
    (folder / "state.json").write_text('{"step": 1}')  # no safetensors beside it
    with pytest.raises(UserError, match="neither a korch checkpoint"):
        apply_from_checkpoint(StageContext(stage_dir=tmp_path / "s"), str(folder))
    assert no_unpickling == [] and not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_torch_load_weights_only_refuses_the_payload(poisoned_run):
    # The one sanctioned way to read a .pt: weights_only=True does not run __reduce__.
    import torch

    final, marker = poisoned_run
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(final / "optimizer.pt", weights_only=True)
    assert not marker.exists()


# --- source scan -----------------------------------------------------------------------------------------

# module -> names that unpickle. torch.load is allowed only as a call with weights_only=True.
_UNPICKLERS = {
    "pickle": {"load", "loads", "Unpickler"}, "_pickle": {"load", "loads", "Unpickler"},
    "cPickle": {"load", "loads", "Unpickler"}, "cloudpickle": {"load", "loads"},
    "ray.cloudpickle": {"load", "loads"}, "dill": {"load", "loads", "Unpickler"}, "joblib": {"load"},
    "shelve": {"open"}, "pandas": {"read_pickle"}, "torch": {"load"}, "torch.serialization": {"load"},
    "numpy": {"load"},
}
_WHOLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "ray.cloudpickle", "dill", "shelve"}


def _imports(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it is: `import numpy as np` gives np -> numpy, `from torch import load as l` gives
    l -> torch.load."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(names.get(node.id, node.id))
    return ".".join(reversed(parts))


def _unpickler(dotted: str | None) -> bool:
    if not dotted or "." not in dotted:
        return False
    module, name = dotted.rsplit(".", 1)
    return name in _UNPICKLERS.get(module, ())


def unsafe_loads(source: str) -> list[str]:
    """Code that unpickles, however it is spelled: torch.load without weights_only=True (also imported by name
    or reached through getattr), pickle/_pickle/cloudpickle/dill load/loads/Unpickler, joblib.load, shelve,
    pandas.read_pickle, numpy.load(allow_pickle=True), importing a pickle module dynamically, and
    from_pretrained(use_safetensors=False)."""
    tree = ast.parse(source)
    names = _imports(tree)
    problems = []
    calls = {id(node.func): node for node in ast.walk(tree) if isinstance(node, ast.Call)}

    def constant(node, key, value):
        kw = {k.arg: k.value for k in node.keywords}.get(key)
        return isinstance(kw, ast.Constant) and kw.value is value

    for node in ast.walk(tree):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if _unpickler(f"{node.module}.{alias.name}") and node.module not in ("numpy",):
                    problems.append(f"{where}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in _WHOLE_MODULES:
                    problems.append(f"{where}: import {alias.name}")
        elif isinstance(node, (ast.Attribute, ast.Name)) and isinstance(getattr(node, "ctx", None), ast.Load):
            dotted = _dotted(node, names)
            if not _unpickler(dotted) or (isinstance(node, ast.Name) and node.id not in names):
                continue
            call = calls.get(id(node))
            if dotted in ("torch.load", "torch.serialization.load") and call is not None and constant(call, "weights_only", True):
                continue
            if dotted == "numpy.load" and (call is None or not constant(call, "allow_pickle", True)):
                continue
            if isinstance(node, ast.Name) and call is None:
                continue  # reported at its import
            problems.append(f"{where}: {dotted}" + ("" if call is not None else " (referenced, not called)"))
        elif isinstance(node, ast.Call):
            func = _dotted(node.func, names) or ""
            args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if func in ("getattr", "builtins.getattr") and len(node.args) >= 2:
                owner = _dotted(node.args[0], names)
                attr = node.args[1]
                if owner in _UNPICKLERS and (not isinstance(attr, ast.Constant) or _unpickler(f"{owner}.{attr.value}")):
                    problems.append(f"{where}: getattr({owner}, {ast.unparse(attr)})")
            elif func in ("importlib.import_module", "__import__") and args and args[0] in _WHOLE_MODULES | {"joblib"}:
                problems.append(f"{where}: {func}({args[0]!r})")
            elif func.endswith("from_pretrained") and constant(node, "use_safetensors", False):
                problems.append(f"{where}: from_pretrained(use_safetensors=False)")
    return problems


SCANNER_CASES = {
    "import torch\ntorch.load(p)\n": 1,
    "import torch\ntorch.load(p, weights_only=False)\n": 1,
    "import torch\ntorch.load(p, weights_only=True, map_location='cpu')\n": 0,
    "import torch as t\nt.load(p)\n": 1,
    "from torch import load\nload(p, weights_only=True)\n": 1,  # by name: reported at the import
    "from torch import load as l\n": 1,
    "import torch\nf = torch.load\n": 1,
    "import torch\ngetattr(torch, 'load')(p)\n": 1,
    "import torch\ngetattr(torch, name)(p)\n": 1,
    "import torch.serialization\ntorch.serialization.load(p)\n": 1,
    "from torch import serialization\nserialization.load(p)\n": 1,
    "import pickle\n": 1,
    "import pickle as p\n": 1,
    "from pickle import loads\n": 1,
    "from pickle import Unpickler\n": 1,
    "import _pickle\n": 1,
    "import cloudpickle\n": 1,
    "from ray import cloudpickle\ncloudpickle.loads(b)\n": 1,
    "import ray.cloudpickle as cp\ncp.loads(b)\n": 2,
    "import dill\n": 1,
    "import joblib\njoblib.load(p)\n": 1,
    "import joblib\njoblib.dump(x, p)\n": 0,
    "import importlib\nimportlib.import_module('pickle')\n": 1,
    "__import__('dill')\n": 1,
    "import numpy as np\nnp.load(p, allow_pickle=True)\n": 1,
    "import numpy as np\nnp.load(p)\n": 0,
    "import pandas as pd\npd.read_pickle(p)\n": 1,
    "M.from_pretrained(p, use_safetensors=False)\n": 1,
    "M.from_pretrained(p, use_safetensors=True)\nimport json\njson.loads(s)\n": 0,
}


@pytest.mark.parametrize("source", sorted(SCANNER_CASES))
def test_scanner_flags_what_it_should(source):
    assert len(unsafe_loads(source)) == SCANNER_CASES[source], unsafe_loads(source)


def test_no_korch_source_unpickles():
    problems = {}
    for path in sorted(SRC.rglob("*.py")):
        found = unsafe_loads(path.read_text(encoding="utf-8"))
        if found:
            problems[str(path.relative_to(REPO))] = found
    assert problems == {}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name


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
    from korch.cli import main
    from korch.cluster.submit import auth_headers, read_auth_token, redact

    token = "s3cr3t-" + os.urandom(8).hex()
    assert read_auth_token({"RAY_AUTH_TOKEN": token, "HOME": "/nonexistent"}) == token
    assert auth_headers(token) == {"Authorization": f"Bearer {token}"}
    assert token not in redact(f"failed with headers {{'Authorization': 'Bearer {token}'}}", [token])
    # A failing request made with the token prints an error; the token must not be in it.
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    capsys.readouterr()
    assert main(["status", "raysubmit_x", "--address", "http://127.0.0.1:9"]) == 2
    out = capsys.readouterr()
    assert "cannot reach the Ray job API at http://127.0.0.1:9" in out.err
    assert token not in out.out + out.err
