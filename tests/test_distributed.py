"""Distributed co-training over gloo: 2 ranks give the bank of 1 process (bit-identical masks,
per-module BatchNorm statistics, equal grafts and history; the model is FC1 with a BatchNorm1d); a killed rank makes the run fail within the timeout and the run
resumes from its last checkpoint. With sampled negatives (each module on its own rows, the
ragged products of the direct step), 2 ranks also give the bank of 1 process."""
import os
import signal
import socket
import time

import pytest

from modsplit import checkpoint, files
from modsplit.distributed import Shard
from tests.decompose_child import launch, same_bank


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, folder, out, delay=0.0, port=None, model="fc1_bn"):
    port = port or _port()
    procs = []
    for rank in range(world):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(launch(folder, out, delay, seed=5, shared_init=False, env=env,
                            model=model))
    return procs


def _ok(procs):
    for p in procs:
        assert p.wait(180) == 0, p.stderr.read().decode()[-3000:]


def test_split_is_contiguous_and_balanced():
    assert Shard.split(10, 3) == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    assert Shard.split(2, 2) == [(0,), (1,)]


def test_two_ranks_equal_one_process_and_survive_a_killed_rank(tmp_path):
    single = _launch(1, "-", tmp_path / "one")
    _ok(single)
    _ok(_launch(2, "-", tmp_path / "two"))
    for rank in (0, 1):  # every rank returns the complete bank
        same_bank(tmp_path / "one.rank0", tmp_path / f"two.rank{rank}")

    folder = tmp_path / "ckpt"
    procs = _launch(2, folder, tmp_path / "killed", delay=0.2)
    deadline, meta = time.monotonic() + 90, None
    while time.monotonic() < deadline and procs[0].poll() is None:
        if os.path.exists(checkpoint.path_in(folder)):
            meta, _ = files.read_file(checkpoint.path_in(folder))
            if meta["epoch"] == 2 and meta["step"] > 0:
                break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    code = procs[0].wait(60)  # the survivor fails: no hang past the 20 s timeout
    assert code != 0 and time.monotonic() - start < 60
    assert meta is not None and meta["epoch"] == 2 and meta["step"] > 0, meta
    _ok(_launch(2, folder, tmp_path / "resumed"))
    same_bank(tmp_path / "one.rank0", tmp_path / "resumed.rank0")


@pytest.mark.parametrize("model", ["fc1_sampled", "fc1_bn_sampled"])
def test_two_ranks_with_sampled_negatives_equal_one_process(tmp_path, model):
    """Each module's rows, kernel paths and (per-module BatchNorm) statistics depend on that
    module alone, not on its shard: the masked MLP's ragged step and forward_ragged."""
    _ok(_launch(1, "-", tmp_path / "one", model=model))
    _ok(_launch(2, "-", tmp_path / "two", model=model))
    meta, _ = files.read_file(tmp_path / "one.rank0")
    assert meta["config"]["neg_ratio"] == 2.0  # the runs did sample their negatives
    for rank in (0, 1):
        same_bank(tmp_path / "one.rank0", tmp_path / f"two.rank{rank}")
