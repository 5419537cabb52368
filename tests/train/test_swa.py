"""SWA as data: the window, the average against hand-averaged weights and torch's AveragedModel, the checkpoint
round trip. The averaged weights in a live DeepSpeed engine (ZeRO 0-3) are checked in test_resume_tensors.py,
and a whole SWA stage with a resume in tests/tasks/test_classify_runs.py."""

from __future__ import annotations

import pytest
import torch

from korch.config import TrainConfig
from korch.train.swa import SwaWindow, average_weights, load_full_weights


def _snapshot(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=generator), "b": torch.randn(4, generator=generator),
            "steps": torch.tensor([seed])}


def test_the_average_is_the_hand_average():
    snaps = [_snapshot(s) for s in (1, 2, 3)]
    averaged = average_weights(snaps)
    torch.testing.assert_close(averaged["w"], (snaps[0]["w"] + snaps[1]["w"] + snaps[2]["w"]) / 3)
    torch.testing.assert_close(averaged["b"], (snaps[0]["b"] + snaps[1]["b"] + snaps[2]["b"]) / 3)
    assert averaged["steps"].tolist() == [3]  # integer buffers: the latest, not a mean
    assert averaged["w"].dtype == torch.float32
    reordered = dict(reversed(list(snaps[2].items())))  # as read back from safetensors: sorted, not model order
    torch.testing.assert_close(average_weights([snaps[1], reordered])["w"], (snaps[1]["w"] + snaps[2]["w"]) / 2)


def test_the_average_matches_torch_averaged_model():
    from torch.optim.swa_utils import AveragedModel

    net = torch.nn.Linear(4, 3)
    swa_model = AveragedModel(net)
    snapshots = []
    for seed in (5, 6, 7):
        torch.manual_seed(seed)
        with torch.no_grad():
            for param in net.parameters():
                param.copy_(torch.randn_like(param))
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
        swa_model.update_parameters(net)
    ours = average_weights(snapshots)
    for name, value in swa_model.module.state_dict().items():
        torch.testing.assert_close(ours[name], value)


def test_the_window_keeps_the_last_k_epochs_once_each():
    window = SwaWindow(2)
    for epoch in (1, 2, 3):
        window.add(epoch, _snapshot(epoch))
    window.add(3, _snapshot(99))  # a resumed run reaching the same epoch end again changes nothing
    assert window.epochs == [2, 3]
    torch.testing.assert_close(window.average()["w"], (_snapshot(2)["w"] + _snapshot(3)["w"]) / 2)
    assert not SwaWindow(None).enabled and SwaWindow(None).epochs == []


def test_the_window_rides_in_a_checkpoint(tmp_path):
    window = SwaWindow(3)
    window.add(1, _snapshot(1))
    window.add(2, _snapshot(2))
    state = window.write(tmp_path)
    assert state == {"swa_epochs": [1, 2]}
    back = SwaWindow.read(tmp_path, 3, state)
    assert back.epochs == [1, 2]
    for (_, a), (_, b) in zip(window.snapshots, back.snapshots):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert SwaWindow.read(tmp_path, None, state).epochs == []  # SWA off in the resumed run
    assert SwaWindow.read(None, 3, {}).epochs == []


def test_load_full_weights_into_a_plain_module():
    net = torch.nn.Linear(4, 3)
    target = {name: torch.full_like(value, 0.5) for name, value in net.state_dict().items()}
    load_full_weights(net, target)
    assert all(torch.equal(value, target[name]) for name, value in net.state_dict().items())
    with pytest.raises(RuntimeError, match="lack parameters"):
        load_full_weights(net, {"weight": target["weight"]})


def test_swa_epochs_is_checked():
    assert TrainConfig(epochs=3, swa_epochs=2).swa_epochs == 2
    with pytest.raises(ValueError):
        TrainConfig(epochs=3, swa_epochs=0)
