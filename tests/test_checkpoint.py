"""Checkpoint / resume of decompose(): bit-identical results after a SIGKILL mid-epoch, and a
clear CheckpointError (nothing restored) for a damaged, foreign or mismatched checkpoint."""
import os
import signal
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from modsplit import checkpoint, decompose, files, memory
from modsplit.app.data import load_dataset
from modsplit.app.models import FC1
from tests.decompose_child import launch, same_bank


def _child(folder, out, delay):
    return launch(folder, out, delay, seed=3)


def test_sigkill_mid_epoch_then_resume_gives_the_same_bank(tmp_path):
    ref = _child("-", tmp_path / "ref.msb", 0)
    folder = tmp_path / "ckpt"
    run = _child(folder, tmp_path / "never.msb", 0.25)
    deadline, meta = time.monotonic() + 90, None
    while time.monotonic() < deadline and run.poll() is None:
        if os.path.exists(checkpoint.path_in(folder)):
            meta, _ = files.read_file(checkpoint.path_in(folder))
            if meta["epoch"] == 2 and meta["step"] > 0:
                break
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert meta is not None and meta["epoch"] == 2 and 0 < meta["step"] < 8, meta
    assert not os.path.exists(tmp_path / "never.msb")
    resumed = _child(folder, tmp_path / "resumed.msb", 0)
    assert resumed.wait(120) == 0, resumed.stderr.read().decode()
    assert ref.wait(120) == 0, ref.stderr.read().decode()
    same_bank(tmp_path / "ref.msb", tmp_path / "resumed.msb")


@pytest.fixture(scope="module")
def setup():
    ds = load_dataset("digits", "train")
    ds = TensorDataset(*(t[:192] for t in ds.tensors))
    torch.manual_seed(0)
    return FC1(64, 10).eval(), ds


def _run(setup, **kw):
    model, ds = setup
    loader = DataLoader(ds, batch_size=32, shuffle=True)
    kw = {"epochs": 1, "progress": False, **kw}
    return decompose(model, loader, 10, **kw)


def test_resume_after_the_last_epoch_extends_the_run(setup, tmp_path):
    _run(setup, epochs=1, checkpoint_dir=tmp_path)
    meta, _ = files.read_file(checkpoint.path_in(tmp_path))
    assert (meta["epoch"], meta["step"], len(meta["history"])) == (2, 0, 1)
    resumed, straight = _run(setup, epochs=2, checkpoint_dir=tmp_path), _run(setup, epochs=2)
    assert resumed.history == straight.history
    for name, m in straight.masks().items():
        assert torch.equal(resumed.masks()[name], m)
    assert torch.equal(resumed.grafts.weight, straight.grafts.weight)
    fresh = _run(setup, epochs=2, checkpoint_dir=tmp_path, resume=False)
    assert fresh.history == straight.history


def _damage(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "corrupt":
        data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how,message", [("truncated", "truncated or corrupt"),
                                         ("corrupt", "truncated or corrupt"),
                                         ("version", "checkpoint version 99"),
                                         ("bank", "not a decomposition checkpoint")])
def test_bad_checkpoint_fails_clearly(setup, tmp_path, how, message):
    _run(setup, checkpoint_dir=tmp_path)
    path = checkpoint.path_in(tmp_path)
    if how in ("version", "bank"):
        meta, tensors = files.read_file(path)
        meta = {**meta, "checkpoint_version": 99} if how == "version" else {"kind": "x"}
        files.write_file(path, meta, tensors)
    else:
        _damage(path, how)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        _run(setup, epochs=2, checkpoint_dir=tmp_path)


def test_checkpoint_of_another_model_or_config_is_refused(setup, tmp_path):
    _run(setup, checkpoint_dir=tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="different model"):
        _run((FC1(64, 10).eval(), setup[1]), epochs=2, checkpoint_dir=tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="density 0.1 .now 0.2"):
        _run(setup, epochs=2, density=0.2, checkpoint_dir=tmp_path)


def test_restore_checks_every_tensor_before_copying(setup, tmp_path):
    from modsplit.bank import Grafts
    from modsplit.convert import convert
    _run(setup, checkpoint_dir=tmp_path)
    _, tensors = files.read_file(checkpoint.path_in(tmp_path))
    tensors["acc/seen"] = tensors["acc/seen"][:3]  # checked last
    net = convert(setup[0], 10, 0.1, seed=0)
    grafts = Grafts.init_for(range(10), 10)
    opt = torch.optim.SGD(net.score_parameters(), lr=0.1, momentum=0.9)
    before = [s.detach().clone() for s in net.score_parameters()]
    with pytest.raises(checkpoint.CheckpointError, match="acc/seen"):
        checkpoint.restore("x", tensors, net, grafts, opt, range(10), 10, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, net.score_parameters()))
    assert not opt.state


def test_memory_check_fails_early(setup, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: (1024, "test budget"))
    with pytest.raises(memory.ModsplitMemoryError, match="test budget"):
        _run(setup)
    assert _run(setup, check_memory=False).n_modules == 10
