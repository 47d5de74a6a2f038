"""Distributed co-training over gloo: 2 ranks give the bank of 1 process (bit-identical masks,
equal grafts and history); a killed rank makes the run fail within the timeout and the run
resumes from its last checkpoint."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from modsplit import checkpoint, files
from modsplit.distributed import Shard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One rank (or the single process, WORLD_SIZE=1) decomposing an untrained seeded FC1 on 256
# MNIST images, 2 epochs; argv: checkpoint folder or "-", output prefix, seconds per batch.
CHILD = r"""
import datetime, os, sys, time
import torch
torch.set_num_threads(1)
from torch.utils.data import DataLoader
from modsplit import decompose, distributed
from modsplit.data import load_dataset
from modsplit.models import FC1

class Slow:
    def __init__(self, loader, delay):
        self.loader, self.dataset, self.batch_size, self.delay = loader, loader.dataset, 32, delay
    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch

folder, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
distributed.init_from_env(timeout=datetime.timedelta(seconds=20))
torch.manual_seed(0)
model = FC1().eval()
loader = Slow(DataLoader(load_dataset("mnist", "train", limit=256), batch_size=32,
                         shuffle=True), delay)
bank = decompose(model, loader, 10, epochs=2, progress=False, seed=5, distributed="auto",
                 shared_init=False, checkpoint_dir=None if folder == "-" else folder,
                 checkpoint_every=2)
bank.save(f"{out}.rank{os.environ.get('RANK', '0')}")
"""


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, folder, out, delay=0.0, port=None):
    port = port or _port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(out),
                                       str(delay)], env=env, stderr=subprocess.PIPE))
    return procs


def _ok(procs):
    for p in procs:
        assert p.wait(180) == 0, p.stderr.read().decode()[-3000:]


def _same_bank(a, b):
    (ma, ta), (mb, tb) = files.read_file(a), files.read_file(b)
    assert ma == mb  # fingerprint, classes, history (loss, JI, RPs of every epoch) ...
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_split_is_contiguous_and_balanced():
    assert Shard.split(10, 3) == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    assert Shard.split(2, 2) == [(0,), (1,)]


def test_two_ranks_equal_one_process_and_survive_a_killed_rank(tmp_path):
    single = _launch(1, "-", tmp_path / "one")
    _ok(single)
    _ok(_launch(2, "-", tmp_path / "two"))
    for rank in (0, 1):  # every rank returns the complete bank
        _same_bank(tmp_path / "one.rank0", tmp_path / f"two.rank{rank}")

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
    _same_bank(tmp_path / "one.rank0", tmp_path / "resumed.rank0")
