"""Unpickling guard for korch runs in subprocesses and their Ray workers (tests only).

Put this folder first on PYTHONPATH and set KORCH_UNPICKLE_GUARD_ROOT (a folder: the runs dir and planted
checkpoints) and KORCH_UNPICKLE_GUARD_LOG (a file). Every Python process started with that environment (the
`korch` CLI, the raylet's workers, Ray Train workers) then refuses, and logs, any of:

- torch.load of a file under ROOT (patched when torch is imported),
- pickle.load / pickle.Unpickler / dill / joblib on a file under ROOT,
- pickle.loads / cloudpickle.loads of bytes that contain KORCH_UNPICKLE_GUARD_MARKER (the planted payloads
  carry it). Ray unpickles its own messages with these all the time, so only the argument decides.

Each process that loaded the guard logs {"event": "loaded"} and, once torch is patched, {"event": "torch"}:
the tests check that the guard really ran inside the training workers.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.environ.get("KORCH_UNPICKLE_GUARD_ROOT")
LOG = os.environ.get("KORCH_UNPICKLE_GUARD_LOG")
MARKER = os.environ.get("KORCH_UNPICKLE_GUARD_MARKER", "").encode()


def _log(row: dict) -> None:
    with open(LOG, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"pid": os.getpid(), "argv": sys.argv[:2], **row}) + "\n")


def _under_root(source) -> str | None:
    name = getattr(source, "name", source)
    if isinstance(name, (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(name))
        if path.startswith(os.path.realpath(ROOT) + os.sep):
            return path
    return None


def _refuse(what: str, where: str) -> None:
    _log({"event": "refused", "what": what, "path": where})
    raise RuntimeError(f"korch unpickle guard: {what} on {where}")


def _file_guard(what: str, original):
    def guarded(file, *args, **kwargs):
        where = _under_root(file)
        if where:
            _refuse(what, where)
        return original(file, *args, **kwargs)

    return guarded


def _bytes_guard(what: str, original):
    def guarded(data, *args, **kwargs):
        if MARKER and isinstance(data, (bytes, bytearray, memoryview)) and MARKER in bytes(data):
            _refuse(what, "<bytes carrying the planted payload>")
        return original(data, *args, **kwargs)

    return guarded


def _patch_torch(torch) -> None:
    torch.load = _file_guard("torch.load", torch.load)
    torch.serialization.load = torch.load
    _log({"event": "torch"})


class _PatchOnImport:
    """A meta-path finder that patches a module right after it is first imported."""

    def __init__(self, patches: dict):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module, patch = spec.loader.exec_module, self.patches[name]

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _patch_cloudpickle(module) -> None:
    module.loads = _bytes_guard(f"{module.__name__}.loads", module.loads)
    module.load = _file_guard(f"{module.__name__}.load", module.load)


def _install() -> None:
    import pickle

    pickle.load = _file_guard("pickle.load", pickle.load)
    pickle.loads = _bytes_guard("pickle.loads", pickle.loads)
    original_unpickler = pickle.Unpickler

    class GuardedUnpickler(original_unpickler):
        def __init__(self, file, *args, **kwargs):
            where = _under_root(file)
            if where:
                _refuse("pickle.Unpickler", where)
            super().__init__(file, *args, **kwargs)

    pickle.Unpickler = GuardedUnpickler
    patches = {"torch": _patch_torch, "cloudpickle": _patch_cloudpickle, "ray.cloudpickle": _patch_cloudpickle,
               "dill": lambda m: (setattr(m, "load", _file_guard("dill.load", m.load)),
                                  setattr(m, "loads", _bytes_guard("dill.loads", m.loads))),
               "joblib": lambda m: setattr(m, "load", _file_guard("joblib.load", m.load))}
    sys.meta_path.insert(0, _PatchOnImport(patches))
    _log({"event": "loaded"})


if ROOT and LOG:
    _install()
