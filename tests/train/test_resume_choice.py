"""Which checkpoint a re-run resumes from, as data: the newest one the run logged as written, even when Ray's
own record (its controller registers a checkpoint on its next poll) is one behind."""

from __future__ import annotations

import json
from pathlib import Path

from korch.train.checkpoint import write_checkpoint
from korch.train.loop import newest_checkpoint
from korch.train.runner import newest_logged_checkpoint


def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    import torch

    write_checkpoint(folder, {"w": torch.zeros(2)}, {"w::exp_avg": torch.zeros(2)}, {"step": step})
    if not complete:
        (folder / "optimizer.safetensors").unlink(missing_ok=True)
        (folder / "state.json").unlink()
    return folder


def _events(stage: Path, *steps: int, tail: str = "") -> None:
    lines = [json.dumps({"event": "start", "step": 0})] + [json.dumps({"event": "checkpoint", "step": s}) for s in steps]
    (stage / "events.jsonl").write_text("\n".join(lines) + "\n" + tail)


def test_the_newest_logged_and_complete_checkpoint_of_the_current_run_wins(tmp_path):
    run = tmp_path / "ray" / "train"
    _checkpoint(run / "checkpoint_a", 10)
    newest = _checkpoint(run / "checkpoint_b", 20)
    _checkpoint(run / "checkpoint_c", 30, complete=False)  # the kill came mid-copy
    _checkpoint(tmp_path / "ray" / "train-old" / "checkpoint_z", 90)  # another run's: not this one's
    _events(tmp_path, 10, 20, tail='{"event": "checkpo')  # a line cut short by the kill
    assert newest_logged_checkpoint(tmp_path, "train") == newest


def test_a_checkpoint_not_yet_logged_does_not_count(tmp_path):
    run = tmp_path / "ray" / "train"
    logged = _checkpoint(run / "checkpoint_a", 10)
    _checkpoint(run / "checkpoint_b", 20)  # stored, but the run died before logging it
    _events(tmp_path, 10)
    assert newest_logged_checkpoint(tmp_path, "train") == logged
    assert newest_logged_checkpoint(tmp_path / "nothing", "train") is None


def test_the_loop_takes_the_highest_step_and_prefers_rays_on_a_tie(tmp_path):
    ray_copy, explicit, saved = (str(_checkpoint(tmp_path / name, step)) for name, step in
                                 (("ray", 10), ("explicit", 5), ("saved", 20)))
    assert newest_checkpoint([ray_copy, explicit, saved]) == saved
    same = str(_checkpoint(tmp_path / "same", 10))
    assert newest_checkpoint([ray_copy, None, same]) == ray_copy
    assert newest_checkpoint([None, None, None]) is None
