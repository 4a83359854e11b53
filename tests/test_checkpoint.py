"""Atomic saving, weights-only loading and RNG round trips (util/checkpoint.py, util/rng.py)."""
import argparse
import os
import pathlib
import pickle
import random
from unittest import mock

import numpy as np
import pytest
import torch

from util import checkpoint as ckpt_mod
from util.checkpoint import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    args_from_checkpoint,
    checkpoint_args_to_dict,
    load_checkpoint,
    save_checkpoint,
    save_training_checkpoint,
)
from util.rng import get_rng_state, set_rng_state


class _TouchOnUnpickle:
    """Malicious payload: unpickling it calls Path.touch(marker) (no shell involved)."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _training_state() -> dict:
    """What our training loop stores: model, AdamW, StepLR, epoch, flags, RNG state."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    lr_scheduler.step()
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--output_dir", type=pathlib.Path, default=pathlib.Path("out"))
    parser.add_argument("--multiscale", action="store_true")
    parser.add_argument("--lr_drop_epochs", type=int, nargs="+", default=[40])
    args = parser.parse_args([])
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "epoch": 3,
        "args": checkpoint_args_to_dict(args),
        "rng": get_rng_state(),
    }


def _assert_same(a, b) -> None:
    """Recursive equality for nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_own_checkpoint_loads_with_plain_weights_only(tmp_path):
    state = _training_state()
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(state, path)
    # No allowlist, no safe_globals: the stock weights-only loader must accept every entry.
    loaded = torch.load(path, weights_only=True)
    _assert_same(state, loaded)
    assert loaded["args"]["output_dir"] == "out"
    assert args_from_checkpoint(loaded)["lr_drop_epochs"] == [40]
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1, "w": torch.arange(5)}, path)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(5)}, path)
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1
    assert torch.equal(loaded["w"], torch.arange(5))


def test_save_into_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        save_checkpoint({"epoch": 0}, tmp_path / "nope" / "checkpoint.pth")


def test_save_training_checkpoint_naming(tmp_path):
    written = save_training_checkpoint(tmp_path, {"epoch": 0}, epoch=0, save_every_epoch=2)
    assert [p.name for p in written] == ["checkpoint.pth"]
    written = save_training_checkpoint(tmp_path, {"epoch": 1}, epoch=1, save_every_epoch=2)
    assert [p.name for p in written] == ["checkpoint.pth", "checkpoint0001.pth"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "checkpoint0001.pth"]
    assert load_checkpoint(tmp_path / "checkpoint.pth")["epoch"] == 1
    assert save_training_checkpoint(tmp_path, {}, epoch=1, save_every_epoch=0)[-1].name == "checkpoint.pth"
    with pytest.raises(ValueError, match="save_every_epoch"):
        save_training_checkpoint(tmp_path, {}, epoch=1, save_every_epoch=-1)


def test_official_namespace_checkpoint_loads(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--backbone", type=str, default="resnet50")
    parser.add_argument("--smca", action="store_true")
    parser.add_argument("--output_dir", default="")
    args = parser.parse_args(["--smca", "--lr", "1e-4"])
    path = tmp_path / "SAM-DETR-R50.pth"
    # Official format: plain torch.save of a dict holding the Namespace itself.
    torch.save({"model": {"w": torch.ones(2)}, "args": args, "epoch": 49}, path)

    loaded = load_checkpoint(str(path))
    assert isinstance(loaded["args"], argparse.Namespace)
    assert args_from_checkpoint(loaded) == {"lr": 1e-4, "backbone": "resnet50", "smca": True, "output_dir": ""}
    # The allowlist was local to the call: the process-wide loader still refuses Namespace.
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(path, weights_only=True)


def test_malicious_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _TouchOnUnpickle(marker)}, path)

    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert "getattr" in message and "pathlib" in message
    assert not marker.exists()


def test_malicious_payload_is_real(tmp_path):
    """Guards the test above: the payload does create the marker when unpickled unsafely."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    torch.save({"payload": _TouchOnUnpickle(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_checkpoint_names_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"w": torch.randn(100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="checkpoint.pth"):
        load_checkpoint(path)
    path.write_bytes(b"<html>quota exceeded</html>")
    with pytest.raises(CorruptCheckpointError, match="checkpoint.pth"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="checkpoint.pth"):
        load_checkpoint(path)


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_checkpoint(tmp_path / "absent.pth")


def test_https_dispatches_to_hub_weights_only():
    url = "https://example.org/checkpoints/sam_detr-0123abcd.pth"
    with mock.patch.object(torch.hub, "load_state_dict_from_url", return_value={"model": {}}) as hub:
        assert load_checkpoint(url) == {"model": {}}
    hub.assert_called_once()
    assert hub.call_args.args == (url,)
    assert hub.call_args.kwargs["weights_only"] is True
    assert hub.call_args.kwargs["map_location"] == "cpu"
    assert hub.call_args.kwargs["check_hash"] is True


def test_https_refusal_is_translated():
    url = "https://example.org/evil.pth"
    refusal = pickle.UnpicklingError(
        "Weights only load failed. ... WeightsUnpickler error: Unsupported global: GLOBAL posix.system "
        "was not an allowed global by default. Please use ..."
    )
    with mock.patch.object(torch.hub, "load_state_dict_from_url", side_effect=refusal):
        with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*posix\.system"):
            load_checkpoint(url)


@pytest.mark.parametrize("url", ["http://example.org/a.pth", "ftp://example.org/a.pth"])
def test_other_schemes_refused(url):
    with mock.patch.object(torch.hub, "load_state_dict_from_url") as hub:
        with pytest.raises(ValueError, match="example.org"):
            load_checkpoint(url)
    hub.assert_not_called()


def test_args_helpers():
    assert args_from_checkpoint({"model": {}}) == {}
    flags = checkpoint_args_to_dict({"p": pathlib.Path("a/b"), "n": np.int64(3), "l": (1, [2.0, None])})
    assert flags == {"p": "a/b", "n": 3, "l": (1, [2.0, None])}
    assert type(flags["n"]) is int
    with pytest.raises(TypeError, match="'device'"):
        checkpoint_args_to_dict({"device": torch.device("cpu")})
    with pytest.raises(TypeError, match="'args'"):
        args_from_checkpoint({"args": 5})


def _draw() -> list:
    return [torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random(), random.gauss(0, 1)]


def test_rng_state_restores_and_round_trips(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    state = get_rng_state()
    first = _draw()
    set_rng_state(state)
    assert _draw() == first

    path = tmp_path / "rng.pth"
    save_checkpoint({"rng": state}, path)
    _draw()
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert _draw() == first
    set_rng_state(load_checkpoint(path)["rng"])
    assert _draw() == first


def test_rng_state_rejects_unknown_entries():
    with pytest.raises(KeyError, match="bogus"):
        set_rng_state({"bogus": 1})
